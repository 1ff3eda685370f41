//! The synthetic body: an elliptic torso with organs as axis-aligned ellipsoids, lesions as spheres clipped
//! to their organ, and CT numbers (HU) per tissue and contrast phase. Everything here lives in one continuous
//! *body frame* shared by all datasets, so a report sentence ("upper right part of the liver") can be checked
//! against voxels whatever plane or grid a volume was sampled on.
//!
//! Body frame, in units of [`MM_PER_UNIT`] millimetres: `x` from the patient's right (-1) to left (+1), `y`
//! from anterior (-1) to posterior (+1), `z` from superior (-1) to inferior (+1). The torso is an elliptic
//! cylinder along `z`; outside it is air.

use serde::Serialize;

use crate::rng::{uniform, SynthRng};
use rand::Rng;

/// Millimetres per body-frame unit (the torso is about 340 mm wide).
pub const MM_PER_UNIT: f64 = 200.0;

/// CT number of air, used outside the torso in the NIfTI volumes.
pub const AIR_HU: f64 = -1000.0;

/// The labelled organs, in painting order: where ellipsoids overlap, the later organ wins, so every voxel
/// carries exactly one organ and a mask channel never claims voxels of another organ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Organ {
    Liver,
    Spleen,
    RightKidney,
    LeftKidney,
    Pancreas,
    Aorta,
    Gallbladder,
    Bladder,
}

impl Organ {
    /// All organs in painting order.
    pub const ALL: [Organ; 8] = [
        Organ::Liver,
        Organ::Spleen,
        Organ::RightKidney,
        Organ::LeftKidney,
        Organ::Pancreas,
        Organ::Aorta,
        Organ::Gallbladder,
        Organ::Bladder,
    ];

    /// Organs large enough to hold a lesion that stays visible after resizing to 32 x 256 x 256.
    pub const LESION_HOSTS: [Organ; 4] = [
        Organ::Liver,
        Organ::Spleen,
        Organ::RightKidney,
        Organ::LeftKidney,
    ];

    /// The label name as M3D-Seg writes it (lower case, e.g. `"right kidney"`).
    pub fn name(self) -> &'static str {
        match self {
            Organ::Liver => "liver",
            Organ::Spleen => "spleen",
            Organ::RightKidney => "right kidney",
            Organ::LeftKidney => "left kidney",
            Organ::Pancreas => "pancreas",
            Organ::Aorta => "aorta",
            Organ::Gallbladder => "gallbladder",
            Organ::Bladder => "bladder",
        }
    }

    /// The name as a VQA answer (capitalised).
    pub fn display(self) -> &'static str {
        match self {
            Organ::Liver => "Liver",
            Organ::Spleen => "Spleen",
            Organ::RightKidney => "Right kidney",
            Organ::LeftKidney => "Left kidney",
            Organ::Pancreas => "Pancreas",
            Organ::Aorta => "Aorta",
            Organ::Gallbladder => "Gallbladder",
            Organ::Bladder => "Urinary bladder",
        }
    }

    /// Canonical centre and radii in the body frame.
    fn canonical(self) -> ([f64; 3], [f64; 3]) {
        match self {
            Organ::Liver => ([-0.42, -0.05, -0.55], [0.33, 0.35, 0.28]),
            Organ::Spleen => ([0.50, 0.22, -0.55], [0.15, 0.18, 0.20]),
            Organ::RightKidney => ([-0.30, 0.30, -0.15], [0.12, 0.13, 0.20]),
            Organ::LeftKidney => ([0.30, 0.30, -0.10], [0.12, 0.13, 0.20]),
            Organ::Pancreas => ([0.05, 0.05, -0.25], [0.28, 0.07, 0.07]),
            Organ::Aorta => ([0.05, 0.22, 0.0], [0.05, 0.05, 0.95]),
            Organ::Gallbladder => ([-0.22, -0.32, -0.38], [0.06, 0.06, 0.09]),
            Organ::Bladder => ([0.0, -0.15, 0.72], [0.18, 0.15, 0.15]),
        }
    }

    /// CT number by phase: enhancement differs per organ so the phase can be read from the voxels.
    fn hu(self, phase: Phase) -> f64 {
        let table = match self {
            Organ::Liver => [55.0, 70.0, 110.0, 90.0],
            Organ::Spleen => [45.0, 120.0, 120.0, 95.0],
            Organ::RightKidney | Organ::LeftKidney => [30.0, 180.0, 150.0, 130.0],
            Organ::Pancreas => [40.0, 110.0, 90.0, 70.0],
            Organ::Aorta => [40.0, 280.0, 160.0, 120.0],
            Organ::Gallbladder => [10.0, 10.0, 10.0, 10.0],
            // Contrast is excreted into the bladder only in the delayed phase.
            Organ::Bladder => [5.0, 5.0, 5.0, 240.0],
        };
        table[phase as usize]
    }
}

/// Contrast phase of an acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    NonContrast = 0,
    Arterial = 1,
    PortalVenous = 2,
    Delayed = 3,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::NonContrast,
        Phase::Arterial,
        Phase::PortalVenous,
        Phase::Delayed,
    ];

    /// The phase as it appears in a Radiopaedia-style series folder name.
    pub fn folder_part(self) -> &'static str {
        match self {
            Phase::NonContrast => "non_contrast",
            Phase::Arterial => "C__arterial_phase",
            Phase::PortalVenous => "C__portal_venous_phase",
            Phase::Delayed => "C__delayed_phase",
        }
    }

    /// The phase as a VQA answer.
    pub fn answer(self) -> &'static str {
        match self {
            Phase::NonContrast => "Non-contrast",
            Phase::Arterial => "Arterial phase",
            Phase::PortalVenous => "Portal venous phase",
            Phase::Delayed => "Delayed phase",
        }
    }
}

/// What a lesion looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LesionKind {
    /// Dark (water density), whatever the phase.
    Cyst,
    /// Brighter than its organ by a fixed margin in every phase.
    HyperdenseMass,
    /// Very bright and small.
    Calcification,
}

impl LesionKind {
    pub const ALL: [LesionKind; 3] = [
        LesionKind::Cyst,
        LesionKind::HyperdenseMass,
        LesionKind::Calcification,
    ];

    /// The kind as a VQA answer.
    pub fn answer(self) -> &'static str {
        match self {
            LesionKind::Cyst => "Cyst",
            LesionKind::HyperdenseMass => "Hyperdense mass",
            LesionKind::Calcification => "Calcification",
        }
    }

    /// The kind as a report phrase.
    pub fn phrase(self) -> &'static str {
        match self {
            LesionKind::Cyst => "well-defined hypodense cyst",
            LesionKind::HyperdenseMass => "hyperdense, avidly enhancing mass",
            LesionKind::Calcification => "dense calcification",
        }
    }

    fn hu(self, organ_hu: f64) -> f64 {
        match self {
            LesionKind::Cyst => 5.0,
            LesionKind::HyperdenseMass => organ_hu + 80.0,
            LesionKind::Calcification => 550.0,
        }
    }
}

/// Where a lesion sits inside its organ, from the patient's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Location {
    /// Above the organ centre (smaller body `z`).
    pub superior: bool,
    /// On the patient's left of the organ centre (larger body `x`).
    pub patient_left: bool,
}

impl Location {
    /// All four answers in a fixed order.
    pub const ALL: [Location; 4] = [
        Location {
            superior: true,
            patient_left: false,
        },
        Location {
            superior: true,
            patient_left: true,
        },
        Location {
            superior: false,
            patient_left: false,
        },
        Location {
            superior: false,
            patient_left: true,
        },
    ];

    /// The location as a VQA answer (contains a comma on purpose: real CSV quoting).
    pub fn answer(self) -> &'static str {
        match (self.superior, self.patient_left) {
            (true, false) => "Superior part, right side",
            (true, true) => "Superior part, left side",
            (false, false) => "Inferior part, right side",
            (false, true) => "Inferior part, left side",
        }
    }

    /// The location as a report phrase.
    pub fn phrase(self) -> &'static str {
        match (self.superior, self.patient_left) {
            (true, false) => "upper right part",
            (true, true) => "upper left part",
            (false, false) => "lower right part",
            (false, true) => "lower left part",
        }
    }
}

/// An axis-aligned ellipsoid in the body frame.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ellipsoid {
    pub centre: [f64; 3],
    pub radii: [f64; 3],
}

impl Ellipsoid {
    pub fn contains(&self, p: [f64; 3]) -> bool {
        let s: f64 = p
            .iter()
            .zip(self.centre.iter().zip(&self.radii))
            .map(|(p, (c, r))| ((p - c) / r).powi(2))
            .sum();
        s <= 1.0
    }
}

/// One organ as placed in one body.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OrganInstance {
    pub organ: Organ,
    pub shape: Ellipsoid,
}

/// One lesion: a sphere clipped to its host organ (voxels of the sphere outside the organ stay organ-free).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Lesion {
    pub organ: Organ,
    pub kind: LesionKind,
    pub centre: [f64; 3],
    pub radius: f64,
    pub location: Location,
}

impl Lesion {
    /// Diameter in centimetres, for report text.
    pub fn diameter_cm(&self) -> f64 {
        2.0 * self.radius * MM_PER_UNIT / 10.0
    }
}

/// The tissue at a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tissue {
    Air,
    Fat,
    Muscle,
    Bone,
    /// Index into [`Phantom::organs`].
    Organ(u8),
    /// Index into [`Phantom::lesions`] (the host organ is the lesion's organ).
    Lesion(u8),
}

/// How to draw a body.
#[derive(Debug, Clone, Default)]
pub struct PhantomSpec {
    /// Number of lesions, each in a different host organ (at most 4).
    pub lesions: usize,
    /// Organs that must be absent (e.g. to give a Seg case an empty mask channel).
    pub absent: Vec<Organ>,
    /// Whether the gallbladder may be randomly absent (cholecystectomy).
    pub random_cholecystectomy: bool,
    /// Host organ and kind of the first lesion (random when `None`), to balance classes across cases.
    pub first_lesion: Option<(Organ, LesionKind)>,
}

/// One synthetic body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Phantom {
    /// Torso semi-axes along x and y.
    pub torso: [f64; 2],
    /// Present organs in painting order.
    pub organs: Vec<OrganInstance>,
    pub lesions: Vec<Lesion>,
}

/// Thickness of the muscular body wall as a fraction of the torso radii.
const WALL: f64 = 0.9;
/// Vertebral column: a bone cylinder behind the aorta.
const SPINE_CENTRE: [f64; 2] = [0.0, 0.45];
const SPINE_RADIUS: f64 = 0.09;

impl Phantom {
    /// Draws a body: canonical organs with jittered centres and radii, and `spec.lesions` lesions.
    pub fn sample(rng: &mut SynthRng, spec: &PhantomSpec) -> Phantom {
        let torso = [uniform(rng, 0.80, 0.88), uniform(rng, 0.58, 0.64)];
        let cholecystectomy = spec.random_cholecystectomy && rng.random_bool(0.25);
        let mut organs = Vec::with_capacity(Organ::ALL.len());
        for organ in Organ::ALL {
            let (c, r) = organ.canonical();
            // Draw even for absent organs so absence does not shift the rest of the stream.
            let mut centre = [0.0; 3];
            let mut radii = [0.0; 3];
            for a in 0..3 {
                centre[a] = c[a] + uniform(rng, -0.03, 0.03);
                radii[a] = r[a] * uniform(rng, 0.9, 1.1);
            }
            let absent =
                spec.absent.contains(&organ) || (organ == Organ::Gallbladder && cholecystectomy);
            if !absent {
                organs.push(OrganInstance {
                    organ,
                    shape: Ellipsoid { centre, radii },
                });
            }
        }
        let mut hosts: Vec<&OrganInstance> = organs
            .iter()
            .filter(|o| Organ::LESION_HOSTS.contains(&o.organ))
            .collect();
        let mut lesions = Vec::new();
        for n in 0..spec.lesions.min(hosts.len()) {
            // Draw both even when forced so forcing does not shift the rest of the stream.
            let mut h = rng.random_range(0..hosts.len());
            let mut kind = LesionKind::ALL[rng.random_range(0..LesionKind::ALL.len())];
            if let (0, Some((organ, k))) = (n, spec.first_lesion) {
                if let Some(i) = hosts.iter().position(|o| o.organ == organ) {
                    h = i;
                    kind = k;
                }
            }
            let host = hosts.remove(h);
            let location = Location::ALL[rng.random_range(0..Location::ALL.len())];
            let s = host.shape;
            let min_r = s.radii.iter().copied().fold(f64::INFINITY, f64::min);
            let scale = if kind == LesionKind::Calcification {
                0.35
            } else {
                0.5
            };
            let radius = min_r * scale * uniform(rng, 0.85, 1.0);
            // Offsets of 30-45 % of the radii keep the lesion inside the organ and its quadrant unambiguous.
            let sx = if location.patient_left { 1.0 } else { -1.0 };
            let sz = if location.superior { -1.0 } else { 1.0 };
            let centre = [
                s.centre[0] + sx * s.radii[0] * uniform(rng, 0.30, 0.45),
                s.centre[1] + s.radii[1] * uniform(rng, -0.15, 0.15),
                s.centre[2] + sz * s.radii[2] * uniform(rng, 0.30, 0.45),
            ];
            lesions.push(Lesion {
                organ: host.organ,
                kind,
                centre,
                radius,
                location,
            });
        }
        Phantom {
            torso,
            organs,
            lesions,
        }
    }

    /// The organ instance of `organ`, if present.
    pub fn organ(&self, organ: Organ) -> Option<&OrganInstance> {
        self.organs.iter().find(|o| o.organ == organ)
    }

    /// The tissue at body-frame point `p`.
    pub fn tissue(&self, p: [f64; 3]) -> Tissue {
        let tx = p[0] / self.torso[0];
        let ty = p[1] / self.torso[1];
        let t = tx * tx + ty * ty;
        if t > 1.0 {
            return Tissue::Air;
        }
        let mut organ = None;
        for (i, o) in self.organs.iter().enumerate() {
            if o.shape.contains(p) {
                organ = Some(i);
            }
        }
        if let Some(i) = organ {
            let host = self.organs[i].organ;
            for (l, lesion) in self.lesions.iter().enumerate() {
                if lesion.organ == host {
                    let d2: f64 = (0..3).map(|a| (p[a] - lesion.centre[a]).powi(2)).sum();
                    if d2 <= lesion.radius * lesion.radius {
                        return Tissue::Lesion(l as u8);
                    }
                }
            }
            return Tissue::Organ(i as u8);
        }
        let sx = p[0] - SPINE_CENTRE[0];
        let sy = p[1] - SPINE_CENTRE[1];
        if sx * sx + sy * sy <= SPINE_RADIUS * SPINE_RADIUS {
            return Tissue::Bone;
        }
        if t > WALL * WALL {
            Tissue::Muscle
        } else {
            Tissue::Fat
        }
    }

    /// The host organ of a tissue (organ or lesion voxel), if any.
    pub fn organ_of(&self, tissue: Tissue) -> Option<Organ> {
        match tissue {
            Tissue::Organ(i) => Some(self.organs[i as usize].organ),
            Tissue::Lesion(l) => Some(self.lesions[l as usize].organ),
            _ => None,
        }
    }

    /// Noise-free CT number of a tissue in a phase.
    pub fn hu(&self, tissue: Tissue, phase: Phase) -> f64 {
        match tissue {
            Tissue::Air => AIR_HU,
            Tissue::Fat => -100.0,
            Tissue::Muscle => [50.0, 60.0, 70.0, 65.0][phase as usize],
            Tissue::Bone => 650.0,
            Tissue::Organ(i) => self.organs[i as usize].organ.hu(phase),
            Tissue::Lesion(l) => {
                let lesion = &self.lesions[l as usize];
                lesion.kind.hu(lesion.organ.hu(phase))
            }
        }
    }
}

/// How one array axis maps onto a body-frame axis: voxel `i` has its centre at `start + (i + 0.5) * step`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AxisMap {
    /// 0 = x (right to left), 1 = y (anterior to posterior), 2 = z (superior to inferior).
    pub body_axis: usize,
    pub start: f64,
    pub step: f64,
    pub len: usize,
}

impl AxisMap {
    /// An axis of `len` voxels covering `[lo, hi]` of `body_axis`.
    pub fn covering(body_axis: usize, lo: f64, hi: f64, len: usize) -> AxisMap {
        AxisMap {
            body_axis,
            start: lo,
            step: (hi - lo) / len as f64,
            len,
        }
    }

    pub fn coord(&self, i: usize) -> f64 {
        self.start + (i as f64 + 0.5) * self.step
    }

    /// The (fractional) voxel index whose centre is at body coordinate `c`.
    pub fn index_of(&self, c: f64) -> f64 {
        (c - self.start) / self.step - 0.5
    }
}

/// A C-ordered 3-D sampling grid: `axes[0]` varies slowest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Grid {
    pub axes: [AxisMap; 3],
}

impl Grid {
    pub fn shape(&self) -> [usize; 3] {
        [self.axes[0].len, self.axes[1].len, self.axes[2].len]
    }

    pub fn voxels(&self) -> usize {
        self.axes.iter().map(|a| a.len).product()
    }

    /// Samples the tissue at every voxel centre, in C order.
    pub fn tissues(&self, phantom: &Phantom) -> Vec<Tissue> {
        let [n0, n1, n2] = self.shape();
        let mut out = Vec::with_capacity(n0 * n1 * n2);
        let mut p = [0.0; 3];
        for i in 0..n0 {
            p[self.axes[0].body_axis] = self.axes[0].coord(i);
            for j in 0..n1 {
                p[self.axes[1].body_axis] = self.axes[1].coord(j);
                for k in 0..n2 {
                    p[self.axes[2].body_axis] = self.axes[2].coord(k);
                    out.push(phantom.tissue(p));
                }
            }
        }
        out
    }

    /// A body-frame ellipsoid in voxel units of this grid: (centre index, radii in voxels) per array axis.
    pub fn to_voxels(&self, centre: [f64; 3], radii: [f64; 3]) -> ([f64; 3], [f64; 3]) {
        let mut c = [0.0; 3];
        let mut r = [0.0; 3];
        for (a, axis) in self.axes.iter().enumerate() {
            c[a] = axis.index_of(centre[axis.body_axis]);
            r[a] = radii[axis.body_axis] / axis.step.abs();
        }
        (c, r)
    }
}
