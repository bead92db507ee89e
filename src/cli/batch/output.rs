//! Where `batch` writes: one folder per format under the output folder, each
//! file named after its pair (`png16/000046_10.png`, `pfm/frame_000123.pfm`),
//! written under a temporary name and renamed, so a file that exists is
//! complete and an interrupted run never leaves a half-written one that counts
//! as done.

use std::path::{Path, PathBuf};

use crate::pipeline::OutputFormat;

/// The file of `format` for the pair `name`, under an input's output folder.
pub fn output_path(dir: &Path, format: OutputFormat, name: &str) -> PathBuf {
    dir.join(format.label()).join(format!("{name}.{}", format.extension()))
}

/// Every file the pair `name` gets, in the order of `formats`.
pub fn output_paths(dir: &Path, formats: &[OutputFormat], name: &str) -> Vec<PathBuf> {
    formats.iter().map(|&f| output_path(dir, f, name)).collect()
}

/// Whether a pair is done: all its files exist (each was renamed into place whole).
pub fn is_done(dir: &Path, formats: &[OutputFormat], name: &str) -> bool {
    output_paths(dir, formats, name).iter().all(|p| p.is_file())
}

/// The temporary name `path` is written under: hidden, in the same folder
/// (so the rename is atomic), the same for every run (so a leftover one is
/// simply written over).
pub fn partial_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// Writes `bytes` to `path` whole or not at all.
pub fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = partial_name(path);
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_named_after_their_pair_in_one_folder_per_format() {
        let dir = Path::new("/out");
        assert_eq!(output_path(dir, OutputFormat::Png16, "000046_10"), Path::new("/out/png16/000046_10.png"));
        assert_eq!(output_path(dir, OutputFormat::Depth, "frame_000123"), Path::new("/out/depth/frame_000123.pfm"));
        assert_eq!(partial_name(Path::new("/out/ply/a.ply")), Path::new("/out/ply/.a.ply.partial"));
        // Every format has its own folder, so no two formats can share a file.
        let mut paths = output_paths(dir, &OutputFormat::ALL, "x");
        paths.dedup();
        assert_eq!(paths.len(), OutputFormat::ALL.len());
    }

    #[test]
    fn a_pair_is_done_only_when_every_file_is_whole() {
        let dir = std::env::temp_dir().join(format!("stereo-recon-output-{}", std::process::id()));
        let formats = [OutputFormat::Png16, OutputFormat::Pfm];
        assert!(!is_done(&dir, &formats, "a"));
        write_whole(&output_path(&dir, OutputFormat::Png16, "a"), b"png").unwrap();
        // A partial file left by an interruption does not count.
        std::fs::create_dir_all(dir.join("pfm")).unwrap();
        std::fs::write(partial_name(&output_path(&dir, OutputFormat::Pfm, "a")), b"half").unwrap();
        assert!(!is_done(&dir, &formats, "a"));
        write_whole(&output_path(&dir, OutputFormat::Pfm, "a"), b"pfm").unwrap();
        assert!(is_done(&dir, &formats, "a"));
        assert!(!partial_name(&output_path(&dir, OutputFormat::Pfm, "a")).exists(), "written over, then renamed");
        std::fs::remove_dir_all(&dir).ok();
    }
}
