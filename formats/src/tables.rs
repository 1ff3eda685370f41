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
