//! The published column headers of the M3D dataset tables, exactly as the released CSV files spell them.

/// Every M3D-VQA CSV (`M3D_VQA_{train,val,test,test5k}.csv`, `M3D_VQA_yn_train.csv`), in order; the test table
/// has an extra trailing `Note` column.
pub const VQA_COLUMNS: [&str; 10] = [
    "Image Path",
    "Text",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
];

/// `M3D_RefSeg_train.csv` / `M3D_RefSeg_test.csv`, in order.
pub const REFSEG_COLUMNS: [&str; 6] = [
    "Image",
    "Mask",
    "Mask_ID",
    "Question_Type",
    "Question",
    "Answer",
];

/// The 25 M3D-Seg datasets, in the order of their codes `0000`..`0024` (`0000` = CHAOS).
pub const SEG_DATASET_NAMES: [&str; 25] = [
    "CHAOS",
    "HaN-Seg",
    "AMOS22",
    "AbdomenCT-1k",
    "KiTS23",
    "KiPA22",
    "KiTS19",
    "BTCV",
    "Pancreas-CT",
    "3D-IRCADB",
    "FLARE22",
    "TotalSegmentator",
    "CT-ORG",
    "WORD",
    "VerSe19",
    "VerSe20",
    "SLIVER07",
    "QUBIQ",
    "MSD-Colon",
    "MSD-HepaticVessel",
    "MSD-Liver",
    "MSD-Lung",
    "MSD-Pancreas",
    "MSD-Spleen",
    "LUNA16",
];
