//! Finding stereo pairs on disk: the dataset layouts `batch` and `eval` read.
//!
//! A folder is recognised by what it holds, checked in the order of
//! [`Layout::ALL`]; a folder that is none of them is searched one level down,
//! then recursively, in sorted order, so the same tree always gives the same
//! list (which `batch --shard` relies on).

use std::path::{Path, PathBuf};

/// The folder layouts we read, each recognised by the files it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `image_2/` + `image_3/` (KITTI 2015) or `colored_0/` + `colored_1/` (KITTI 2012),
    /// matched by file name; ground truth in `disp_occ_0/` (or `disp_occ`, `disp_noc_0`,
    /// `disp_noc`), calibration in `calib_cam_to_cam/` or `calib/`.
    Kitti,
    /// A Middlebury scene: `im0.*` + `im1.*`, `disp0GT.pfm` (or `disp0.pfm`),
    /// `mask0nocc.png`, `calib.txt`.
    Middlebury,
    /// One pair per folder: `left.*` + `right.*`, `disp_gt.pfm` | `disp_gt_kitti16.png` |
    /// `disp_gt.png` (+ `pair.json` `{"gt_scale": N}`), `calib.json` or `calib.txt`.
    PairFolder,
    /// `left/` + `right/` subfolders, images matched by file name.
    LeftRight,
}

impl Layout {
    pub const ALL: [Layout; 4] = [Layout::Kitti, Layout::Middlebury, Layout::PairFolder, Layout::LeftRight];

    pub fn label(self) -> &'static str {
        match self {
            Layout::Kitti => "kitti",
            Layout::Middlebury => "middlebury",
            Layout::PairFolder => "pair-folder",
            Layout::LeftRight => "left-right",
        }
    }

    /// The pairs in `dir` if it has this layout.
    fn pairs_in(self, dir: &Path) -> std::io::Result<Option<Vec<DatasetPair>>> {
        match self {
            Layout::Kitti => kitti(dir),
            Layout::Middlebury => Ok(middlebury(dir).map(|p| vec![p])),
            Layout::PairFolder => Ok(pair_folder(dir).map(|p| vec![p])),
            Layout::LeftRight => left_right(dir),
        }
    }
}

/// One pair found on disk, with what its dataset says about it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetPair {
    /// The name outputs are given: the image's file stem (KITTI, left/right) or
    /// the folder's name (Middlebury, pair folders).
    pub name: String,
    pub layout: Layout,
    pub left: PathBuf,
    pub right: PathBuf,
    pub ground_truth: Option<PathBuf>,
    /// Middlebury's `mask0nocc.png`: only pixels at 255 (seen by both views) are scored.
    pub mask: Option<PathBuf>,
    /// From `pair.json` `{"gt_scale": N}`, for 8-bit ground truth.
    pub gt_scale: Option<f32>,
    /// The dataset's own calibration file, any format the calibration reader knows.
    pub calibration: Option<PathBuf>,
}

const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"];
/// Ground-truth file names of a pair folder, in order of preference (exact formats first).
const GROUND_TRUTH_FILES: [&str; 3] = ["disp_gt.pfm", "disp_gt_kitti16.png", "disp_gt.png"];
/// KITTI's view folders: 2015's colour cameras, then 2012's.
const KITTI_VIEWS: [(&str, &str); 2] = [("image_2", "image_3"), ("colored_0", "colored_1")];
/// KITTI's ground-truth folders, all pixels first (the benchmark's main figures), then non-occluded.
const KITTI_TRUTH: [&str; 4] = ["disp_occ_0", "disp_occ", "disp_noc_0", "disp_noc"];

fn is_image(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn find_image(dir: &Path, stem: &str) -> Option<PathBuf> {
    IMAGE_EXTENSIONS.iter().map(|ext| dir.join(format!("{stem}.{ext}"))).find(|p| p.is_file())
}

fn first_file(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|f| dir.join(f)).find(|p| p.is_file())
}

fn folder_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string())
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The images directly in `dir`, sorted by file name.
fn images_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(Result::ok).map(|e| e.path()).collect();
    images.retain(|p| is_image(p));
    images.sort();
    Ok(images)
}

/// The pair in `dir`, if it holds `left.*` and `right.*`.
pub fn pair_folder(dir: &Path) -> Option<DatasetPair> {
    let left = find_image(dir, "left")?;
    let right = find_image(dir, "right")?;
    let gt_scale = std::fs::read_to_string(dir.join("pair.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|json| json["gt_scale"].as_f64())
        .map(|s| s as f32);
    Some(DatasetPair {
        name: folder_name(dir),
        layout: Layout::PairFolder,
        left,
        right,
        ground_truth: first_file(dir, &GROUND_TRUTH_FILES),
        mask: None,
        gt_scale,
        calibration: first_file(dir, &["calib.json", "calib.txt", "calib.yaml", "calib.yml"]),
    })
}

fn middlebury(dir: &Path) -> Option<DatasetPair> {
    let left = find_image(dir, "im0")?;
    let right = find_image(dir, "im1")?;
    Some(DatasetPair {
        name: folder_name(dir),
        layout: Layout::Middlebury,
        left,
        right,
        ground_truth: first_file(dir, &["disp0GT.pfm", "disp0.pfm"]),
        mask: first_file(dir, &["mask0nocc.png"]),
        gt_scale: None,
        calibration: first_file(dir, &["calib.txt"]),
    })
}

fn kitti(dir: &Path) -> std::io::Result<Option<Vec<DatasetPair>>> {
    let Some((left_dir, right_dir)) =
        KITTI_VIEWS.iter().map(|(l, r)| (dir.join(l), dir.join(r))).find(|(l, r)| l.is_dir() && r.is_dir())
    else {
        return Ok(None);
    };
    let truth_dir = KITTI_TRUTH.iter().map(|t| dir.join(t)).find(|t| t.is_dir());
    let mut pairs = Vec::new();
    for left in images_in(&left_dir)? {
        let file = left.file_name().expect("a listed file has a name");
        let right = right_dir.join(file);
        if !right.is_file() {
            continue;
        }
        let name = stem(&left);
        // Ground truth exists for the reference frame only (`000046_10`), under the same name.
        let ground_truth = truth_dir.as_ref().map(|t| t.join(file)).filter(|p| p.is_file());
        // One calibration per sequence: `000046_10` and `000046_11` share `000046.txt`.
        let sequence = name.split('_').next().unwrap_or(&name);
        let calibration = ["calib_cam_to_cam", "calib"]
            .iter()
            .map(|c| dir.join(c).join(format!("{sequence}.txt")))
            .find(|p| p.is_file());
        pairs.push(DatasetPair {
            name,
            layout: Layout::Kitti,
            left,
            right,
            ground_truth,
            mask: None,
            gt_scale: None,
            calibration,
        });
    }
    Ok(Some(pairs))
}

fn left_right(dir: &Path) -> std::io::Result<Option<Vec<DatasetPair>>> {
    let (left_dir, right_dir) = (dir.join("left"), dir.join("right"));
    if !(left_dir.is_dir() && right_dir.is_dir()) {
        return Ok(None);
    }
    let mut pairs = Vec::new();
    for left in images_in(&left_dir)? {
        let right = right_dir.join(left.file_name().expect("a listed file has a name"));
        if right.is_file() {
            pairs.push(DatasetPair {
                name: stem(&left),
                layout: Layout::LeftRight,
                left,
                right,
                ground_truth: None,
                mask: None,
                gt_scale: None,
                calibration: None,
            });
        }
    }
    Ok(Some(pairs))
}

/// Every pair under `root`: `root` itself if it has one of the layouts, else
/// every folder below it (sorted by path, recursively).
pub fn discover(root: &Path) -> std::io::Result<Vec<DatasetPair>> {
    for layout in Layout::ALL {
        if let Some(pairs) = layout.pairs_in(root)? {
            return Ok(pairs);
        }
    }
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(root)?.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    let mut found = Vec::new();
    for dir in dirs {
        found.extend(discover(&dir)?);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let root = std::env::temp_dir().join(format!("stereo-recon-dataset-{name}-{}", std::process::id()));
            std::fs::remove_dir_all(&root).ok();
            Tree(root)
        }
        fn file(&self, path: &str) -> PathBuf {
            let path = self.0.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"x").unwrap();
            path
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    #[test]
    fn every_layout_is_recognised() {
        let tree = Tree::new("layouts");
        // KITTI 2015, with a frame missing its right view (left out) and a file that is no image.
        let kitti_left = tree.file("kitti/training/image_2/000046_10.png");
        tree.file("kitti/training/image_3/000046_10.png");
        tree.file("kitti/training/image_2/000046_11.png");
        tree.file("kitti/training/image_3/000046_11.png");
        tree.file("kitti/training/image_2/000047_10.png");
        tree.file("kitti/training/image_2/notes.txt");
        let truth = tree.file("kitti/training/disp_occ_0/000046_10.png");
        tree.file("kitti/training/disp_noc_0/000046_10.png");
        let calib = tree.file("kitti/training/calib_cam_to_cam/000046.txt");
        // Middlebury.
        tree.file("mb/Adirondack/im0.png");
        tree.file("mb/Adirondack/im1.png");
        let mb_truth = tree.file("mb/Adirondack/disp0GT.pfm");
        let mask = tree.file("mb/Adirondack/mask0nocc.png");
        let mb_calib = tree.file("mb/Adirondack/calib.txt");
        // left/ + right/.
        tree.file("lr/left/b.jpg");
        tree.file("lr/right/b.jpg");
        tree.file("lr/left/a.jpg");
        tree.file("lr/right/a.jpg");
        tree.file("lr/left/only-left.jpg");
        // A pair folder.
        tree.file("pf/scene/left.png");
        tree.file("pf/scene/right.png");

        let kitti = discover(&tree.0.join("kitti")).unwrap();
        let names: Vec<&str> = kitti.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["000046_10", "000046_11"]);
        assert_eq!(kitti[0].left, kitti_left);
        assert_eq!(kitti[0].ground_truth, Some(truth), "all pixels (occ) preferred");
        assert_eq!(kitti[1].ground_truth, None, "the second frame has none");
        assert_eq!((kitti[0].calibration.as_ref(), kitti[1].calibration.as_ref()), (Some(&calib), Some(&calib)));

        let mb = discover(&tree.0.join("mb")).unwrap();
        assert_eq!(mb.len(), 1);
        assert_eq!((mb[0].name.as_str(), mb[0].layout), ("Adirondack", Layout::Middlebury));
        assert_eq!((mb[0].ground_truth.clone(), mb[0].mask.clone()), (Some(mb_truth), Some(mask)));
        assert_eq!(mb[0].calibration, Some(mb_calib));

        let lr = discover(&tree.0.join("lr")).unwrap();
        let names: Vec<&str> = lr.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "sorted, matched by name, unmatched left out");

        let all = discover(&tree.0).unwrap();
        let layouts: Vec<&str> = all.iter().map(|p| p.layout.label()).collect();
        assert_eq!(layouts, ["kitti", "kitti", "left-right", "left-right", "middlebury", "pair-folder"]);
    }

    #[test]
    fn pair_folders_and_their_ground_truth() {
        let tree = Tree::new("pairs");
        let a = tree.0.join("a");
        tree.file("a/left.png");
        tree.file("a/right.png");
        tree.file("a/disp_gt.pfm");
        tree.file("a/disp_gt.png");
        tree.file("nested/b/left.jpg");
        tree.file("nested/b/right.jpg");
        std::fs::write(tree.0.join("nested/b/pair.json"), br#"{"gt_scale": 4}"#).unwrap();
        let pairs = discover(&tree.0).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].name, "a");
        assert_eq!(pairs[0].ground_truth, Some(a.join("disp_gt.pfm")), "PFM preferred");
        assert_eq!(pairs[1].name, "b");
        assert_eq!((pairs[1].ground_truth.clone(), pairs[1].gt_scale), (None, Some(4.0)));
        assert_eq!(discover(&a).unwrap().len(), 1, "a pair folder is its own single pair");
    }
}
