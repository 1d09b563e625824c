//! IDX data sets (MNIST, Fashion-MNIST, KMNIST, EMNIST): loading, checking, batching.
//!
//! # Layout
//!
//! - [`load_split`] / [`load_idx_pair`] read an images file and a labels file (raw or gzip,
//!   detected by the magic bytes `1f 8b`, not the extension) into a [`Dataset`] of `u8` pixels,
//!   checking every header field against the data; each failure names the file and what is wrong.
//! - [`resolve_data_dir`] turns `--dataset` / `--data-dir` into a folder; [`split_paths`] finds
//!   the standard file names in it.
//! - [`epoch_permutation`] and [`make_batch`] turn a data set into shuffled, optionally shifted
//!   `f32` batches, all randomness coming from the run's seed.
//! - [`write_idx_images`], [`write_idx_labels`] and [`write_synthetic`] make small data sets for
//!   tests.
//!
//! The IDX format is big-endian: a magic number `0x0000_08TD` (T = element type, `08` = u8;
//! D = number of dimensions), then one `u32` per dimension, then the elements in row-major order.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};
use crate::loss::Targets;
use crate::rng::Rng;

/// Where `apt-get install dataset-fashion-mnist` puts the data set on Debian and Ubuntu.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The folder that holds the Debian data set packages; a preset name is a subfolder of it.
pub const DATASETS_ROOT: &str = "/usr/share/datasets";

/// The names `--dataset` accepts.
pub const PRESETS: &[&str] = &["fashion-mnist"];

/// IDX magic for u8 images: type 0x08 (unsigned byte), 3 dimensions (n, rows, cols).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic for u8 labels: type 0x08 (unsigned byte), 1 dimension (n).
const LABELS_MAGIC: u32 = 0x0000_0801;
const IMAGES_HEADER: usize = 16;
const LABELS_HEADER: usize = 8;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// IDX files read as u8 images `[n, rows, cols]` + u8 labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
    pub classes: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The `rows * cols` pixels of image `i`, row-major. Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let px = self.rows * self.cols;
        &self.images[i * px..(i + 1) * px]
    }

    /// Image `i` as f32 in [0, 1]. Panics if `i >= len()`.
    pub fn image_f32(&self, i: usize) -> Vec<f32> {
        self.image(i)
            .iter()
            .map(|&p| f32::from(p) / 255.0)
            .collect()
    }

    /// First n samples (for quick runs); n larger than len keeps all.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.images.truncate(n * self.rows * self.cols);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// The file name prefix of the split in the standard MNIST naming.
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Finds the first existing file among the standard spellings of one file of a split:
/// `{prefix}-{kind}-{idx}` and `{prefix}-{kind}.{idx}`, each raw before `.gz`.
fn find_split_file(dir: &Path, prefix: &str, kind: &str, idx: &str) -> Result<PathBuf> {
    let standard = format!("{prefix}-{kind}-{idx}");
    let dotted = format!("{prefix}-{kind}.{idx}");
    for base in [&standard, &dotted] {
        for name in [base.clone(), format!("{base}.gz")] {
            let path = dir.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    Err(CoreError::io(
        dir.join(&standard),
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "not found (looked for {standard}, {standard}.gz, {dotted} and {dotted}.gz in {})",
                dir.display()
            ),
        ),
    ))
}

/// Standard file names: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each either raw or with `.gz` (raw is
/// preferred when both exist). The dotted variants (`train-images.idx3-ubyte`, ...) are accepted
/// too. Returns `(images, labels)`; a missing file is an `Io` error naming it and the folder.
pub fn split_paths(dir: &Path, split: Split) -> Result<(PathBuf, PathBuf)> {
    let prefix = split.prefix();
    let images = find_split_file(dir, prefix, "images", "idx3-ubyte")?;
    let labels = find_split_file(dir, prefix, "labels", "idx1-ubyte")?;
    Ok((images, labels))
}

/// Loads a split from a directory, checking each image is `image_size x image_size` and every
/// label `< classes`.
pub fn load_split(dir: &Path, split: Split, classes: usize, image_size: usize) -> Result<Dataset> {
    let (images, labels) = split_paths(dir, split)?;
    load_idx_pair(&images, &labels, classes, ImageSize::Exactly(image_size))
}

/// Loads a split of images of `size` (a run's [`crate::train::Inputs::data_size`]).
pub fn load_split_for(
    dir: &Path,
    split: Split,
    classes: usize,
    size: ImageSize,
) -> Result<Dataset> {
    let (images, labels) = split_paths(dir, split)?;
    load_idx_pair(&images, &labels, classes, size)
}

/// The image sizes a load accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageSize {
    Exactly(usize),
    /// Any size up to this on both sides (images for a canvas).
    AtMost(usize),
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(bytes);
    }
    // Concatenated gzip members are legal; MultiGzDecoder reads them all.
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(4));
    flate2::read::MultiGzDecoder::new(bytes.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| CoreError::data(path, format!("corrupt or truncated gzip data: {e}")))?;
    Ok(out)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn describe_magic(m: u32) -> &'static str {
    match m {
        IMAGES_MAGIC => "IDX u8 images, 3 dims",
        LABELS_MAGIC => "IDX u8 labels, 1 dim",
        _ => "not a u8 IDX file",
    }
}

/// Checks the magic and header length of an IDX file; `what` is "images" or "labels".
fn check_header(path: &Path, bytes: &[u8], expected: u32, header: usize) -> Result<()> {
    let what = if expected == IMAGES_MAGIC {
        "images"
    } else {
        "labels"
    };
    if bytes.len() < 4 {
        return Err(CoreError::data(
            path,
            format!(
                "truncated IDX {what} header: expected {header} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    let found = be_u32(bytes, 0);
    if found != expected {
        let (other, other_magic) = if expected == IMAGES_MAGIC {
            ("labels", LABELS_MAGIC)
        } else {
            ("images", IMAGES_MAGIC)
        };
        let hint = if found == other_magic {
            format!("; this is an IDX {other} file: are the images and labels files swapped?")
        } else {
            String::new()
        };
        return Err(CoreError::data(
            path,
            format!(
                "bad magic number 0x{found:08x} ({}), expected 0x{expected:08x} ({}){hint}",
                describe_magic(found),
                describe_magic(expected)
            ),
        ));
    }
    if bytes.len() < header {
        return Err(CoreError::data(
            path,
            format!(
                "truncated IDX {what} header: expected {header} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Checks that the data after the header is exactly `n` elements of `per_item` bytes.
fn check_body(path: &Path, body: usize, n: usize, per_item: usize, what: &str) -> Result<()> {
    let expected = n.checked_mul(per_item).ok_or_else(|| {
        CoreError::data(
            path,
            format!("header claims {n} {what} of {per_item} bytes: too large"),
        )
    })?;
    if body < expected {
        return Err(CoreError::data(
            path,
            format!(
                "truncated data: header says {n} {what} ({expected} bytes) but only {body} bytes follow the header"
            ),
        ));
    }
    if body > expected {
        return Err(CoreError::data(
            path,
            format!(
                "{} unexpected trailing bytes: header says {n} {what} ({expected} bytes) but {body} bytes follow the header",
                body - expected
            ),
        ));
    }
    Ok(())
}

/// Reads an IDX u8 images file; returns (pixels, n, rows, cols).
fn read_images(path: &Path, size: ImageSize) -> Result<(Vec<u8>, usize, usize, usize)> {
    let mut bytes = read_maybe_gz(path)?;
    check_header(path, &bytes, IMAGES_MAGIC, IMAGES_HEADER)?;
    let n = be_u32(&bytes, 4) as usize;
    let rows = be_u32(&bytes, 8) as usize;
    let cols = be_u32(&bytes, 12) as usize;
    match size {
        ImageSize::Exactly(s) if rows != s || cols != s => {
            return Err(CoreError::data(
                path,
                format!("wrong image size: expected {s}x{s}, found {rows}x{cols}"),
            ));
        }
        ImageSize::AtMost(c) if rows > c || cols > c || rows == 0 || cols == 0 => {
            return Err(CoreError::data(
                path,
                format!("images of {rows}x{cols} do not fit on the {c}x{c} canvas"),
            ));
        }
        _ => {}
    }
    check_body(path, bytes.len() - IMAGES_HEADER, n, rows * cols, "images")?;
    // Drop the header in place: one memmove of the pixels, no second 47 MB allocation.
    bytes.drain(..IMAGES_HEADER);
    Ok((bytes, n, rows, cols))
}

/// Reads an IDX u8 labels file.
fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = read_maybe_gz(path)?;
    check_header(path, &bytes, LABELS_MAGIC, LABELS_HEADER)?;
    let n = be_u32(&bytes, 4) as usize;
    check_body(path, bytes.len() - LABELS_HEADER, n, 1, "labels")?;
    bytes.drain(..LABELS_HEADER);
    Ok(bytes)
}

/// Reads an images/labels pair with every check: magic numbers (with a hint when the two files
/// are swapped), header and data lengths, gzip integrity, image size, matching counts and label
/// range.
pub fn load_idx_pair(
    images: &Path,
    labels: &Path,
    classes: usize,
    size: ImageSize,
) -> Result<Dataset> {
    let (pixels, n, rows, cols) = read_images(images, size)?;
    let label_bytes = read_labels(labels)?;
    if label_bytes.len() != n {
        return Err(CoreError::data(
            images,
            format!(
                "image/label count mismatch: {} has {n} images but {} has {} labels",
                images.display(),
                labels.display(),
                label_bytes.len()
            ),
        ));
    }
    if let Some((i, &l)) = label_bytes
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= classes)
    {
        return Err(CoreError::data(
            labels,
            format!(
                "label out of range at index {i}: value {l}, but there are only {classes} classes (0..{classes})"
            ),
        ));
    }
    tracing::debug!(images = %images.display(), n, rows, cols, "loaded IDX data");
    Ok(Dataset {
        images: pixels,
        labels: label_bytes,
        rows,
        cols,
        classes,
    })
}

/// Resolves `--dataset` / `--data-dir`: a `data_dir` wins; otherwise the preset name
/// (`"fashion-mnist"` -> [`FASHION_MNIST_DIR`]). An unknown preset, or neither argument, is a
/// `Config` error listing the known presets; a preset folder without the IDX files is
/// [`CoreError::DatasetMissing`], whose message says how to install it.
pub fn resolve_data_dir(dataset: Option<&str>, data_dir: Option<&Path>) -> Result<PathBuf> {
    resolve_data_dir_in(dataset, data_dir, Path::new(DATASETS_ROOT))
}

/// [`resolve_data_dir`] with the folder that holds the presets given (`preset_root/NAME`), so tests
/// need not depend on what the machine has installed.
pub fn resolve_data_dir_in(
    dataset: Option<&str>,
    data_dir: Option<&Path>,
    preset_root: &Path,
) -> Result<PathBuf> {
    if let Some(dir) = data_dir {
        if !dir.is_dir() {
            return Err(CoreError::data(
                dir,
                "data directory (--data-dir) does not exist or is not a directory",
            ));
        }
        return Ok(dir.to_path_buf());
    }
    let known = PRESETS.join(", ");
    let Some(name) = dataset else {
        return Err(CoreError::Config(format!(
            "no data set given: pass --dataset (one of: {known}) or --data-dir DIR"
        )));
    };
    if !PRESETS.contains(&name) {
        return Err(CoreError::Config(format!(
            "unknown dataset preset {name:?}: known presets are {known}; or use --data-dir DIR"
        )));
    }
    let dir = preset_root.join(name);
    let complete =
        split_paths(&dir, Split::Train).is_ok() && split_paths(&dir, Split::Test).is_ok();
    if !complete {
        return Err(CoreError::DatasetMissing {
            name: name.to_string(),
            path: dir,
        });
    }
    Ok(dir)
}

fn ends_with_gz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gz")
}

/// Writes `bytes` to `path`, gzipped when the path ends in `.gz`.
fn write_maybe_gz(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| CoreError::io(path, e);
    if ends_with_gz(path) {
        let file = std::fs::File::create(path).map_err(io)?;
        let mut enc = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        enc.write_all(bytes).map_err(io)?;
        enc.finish().map_err(io)?;
        Ok(())
    } else {
        std::fs::write(path, bytes).map_err(io)
    }
}

fn dim_u32(path: &Path, what: &str, v: usize) -> Result<[u8; 4]> {
    u32::try_from(v).map(u32::to_be_bytes).map_err(|_| {
        CoreError::data(
            path,
            format!("{what} = {v} does not fit an IDX u32 dimension"),
        )
    })
}

/// Writes an IDX u8 images file of `n` images of `rows x cols` (gzipped when the path ends in
/// `.gz`). `images.len()` must be `n * rows * cols`.
pub fn write_idx_images(
    path: &Path,
    images: &[u8],
    n: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if Some(images.len()) != n.checked_mul(rows).and_then(|x| x.checked_mul(cols)) {
        return Err(CoreError::data(
            path,
            format!(
                "cannot write {n} images of {rows}x{cols} from {} bytes",
                images.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(IMAGES_HEADER + images.len());
    bytes.extend_from_slice(&IMAGES_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&dim_u32(path, "n", n)?);
    bytes.extend_from_slice(&dim_u32(path, "rows", rows)?);
    bytes.extend_from_slice(&dim_u32(path, "cols", cols)?);
    bytes.extend_from_slice(images);
    write_maybe_gz(path, &bytes)
}

/// Writes an IDX u8 labels file (gzipped when the path ends in `.gz`).
pub fn write_idx_labels(path: &Path, labels: &[u8]) -> Result<()> {
    let mut bytes = Vec::with_capacity(LABELS_HEADER + labels.len());
    bytes.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&dim_u32(path, "n", labels.len())?);
    bytes.extend_from_slice(labels);
    write_maybe_gz(path, &bytes)
}

/// Draws `n` synthetic images of `size x size`: class `c` is a bright disc in cell `c` of a
/// `g x g` grid (`g = ceil(sqrt(classes))`) over faint uniform noise, so position alone tells the
/// classes apart and a tiny model learns them in a few steps. Labels cycle through `0..classes`.
fn synthetic_images(n: usize, size: usize, classes: usize, rng: &mut Rng) -> (Vec<u8>, Vec<u8>) {
    let g = (1..=classes).find(|g| g * g >= classes).unwrap_or(1);
    let cell = size as f32 / g as f32;
    let radius = (cell / 3.0).max(1.0);
    let mut images = Vec::with_capacity(n * size * size);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % classes;
        let cx = ((c % g) as f32 + 0.5) * cell - 0.5;
        let cy = ((c / g) as f32 + 0.5) * cell - 0.5;
        for y in 0..size {
            for x in 0..size {
                let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                let v = if dx * dx + dy * dy <= radius * radius {
                    200 + rng.below(56)
                } else {
                    rng.below(40)
                };
                // v < 256 by construction.
                images.push(v as u8);
            }
        }
        labels.push(c as u8);
    }
    (images, labels)
}

/// Writes a whole synthetic data set in the standard names (raw, not gz) into `dir` (created if
/// needed): `n_train` and `n_test` images of `size x size`, class-dependent patterns (a bright
/// disc whose position depends on the label, plus seeded noise), labels cycling through
/// `0..classes`. Deterministic in `seed`; train and test draw from different streams.
pub fn write_synthetic(
    dir: &Path,
    n_train: usize,
    n_test: usize,
    size: usize,
    classes: usize,
    seed: u64,
) -> Result<()> {
    if classes == 0 || classes > 256 {
        return Err(CoreError::Config(format!(
            "synthetic data needs 1..=256 classes (u8 labels), got {classes}"
        )));
    }
    if size == 0 {
        return Err(CoreError::Config("synthetic image size must be > 0".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    for (split, n, stream) in [
        (Split::Train, n_train, "synthetic-train"),
        (Split::Test, n_test, "synthetic-test"),
    ] {
        let mut rng = Rng::derive(seed, stream, 0);
        let (images, labels) = synthetic_images(n, size, classes, &mut rng);
        let prefix = split.prefix();
        write_idx_images(
            &dir.join(format!("{prefix}-images-idx3-ubyte")),
            &images,
            n,
            size,
            size,
        )?;
        write_idx_labels(&dir.join(format!("{prefix}-labels-idx1-ubyte")), &labels)?;
    }
    Ok(())
}

/// Permutation of `0..n` for an epoch: `Rng::derive(seed, "shuffle", epoch)` shuffling `0..n`.
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    Rng::derive(seed, "shuffle", epoch).shuffle(&mut perm);
    perm
}

/// A batch as f32 in [0,1], layout `[b, 1, rows, cols]` flattened, labels as usize.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub images: Vec<f32>,
    /// The classes of each image's objects, `[objects, b]` (see [`Targets`]).
    pub labels: Vec<usize>,
    pub rows: usize,
    pub cols: usize,
    /// Objects per image: 1, or 2 for overlapping pairs ([`crate::multi`]).
    pub objects: usize,
    /// Each object alone, `[objects, b, rows, cols]`, the targets of its reconstruction;
    /// empty when the image itself is.
    pub parts: Vec<f32>,
}

impl Batch {
    /// A batch of one object per image.
    pub fn single(images: Vec<f32>, labels: Vec<usize>, rows: usize, cols: usize) -> Self {
        Batch {
            images,
            labels,
            rows,
            cols,
            objects: 1,
            parts: Vec::new(),
        }
    }

    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len() / self.objects.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// What the batch is scored against.
    pub fn targets(&self) -> Targets<'_> {
        Targets {
            labels: &self.labels,
            objects: self.objects.max(1),
            parts: (!self.parts.is_empty()).then_some(self.parts.as_slice()),
        }
    }
}

/// Copies `src` (`rows x cols`) into `dst` shifted by `(dx, dy)` (positive = right / down),
/// scaled to [0,1]; pixels shifted in from outside are 0.
fn shift_into(dst: &mut [f32], src: &[u8], rows: usize, cols: usize, dx: isize, dy: isize) {
    dst.fill(0.0);
    for y in 0..rows {
        let sy = y as isize - dy;
        if sy < 0 || sy >= rows as isize {
            continue;
        }
        let src_row = &src[sy as usize * cols..(sy as usize + 1) * cols];
        let dst_row = &mut dst[y * cols..(y + 1) * cols];
        // Destination columns whose source column x - dx lies inside the image.
        let x0 = dx.max(0) as usize;
        let x1 = (cols as isize + dx.min(0)).max(0) as usize;
        for x in x0..x1.max(x0) {
            dst_row[x] = f32::from(src_row[(x as isize - dx) as usize]) / 255.0;
        }
    }
}

/// Gathers `indices` into a batch. With `shift = Some((rng, max_shift))` each image is shifted by
/// an independent random `(dx, dy)`, each uniform in `[-max_shift, max_shift]` (drawn in that
/// order from `rng`), with zero fill (the paper's augmentation); `None` = no augmentation.
/// Panics if an index is out of range.
pub fn make_batch(ds: &Dataset, indices: &[usize], mut shift: Option<(&mut Rng, usize)>) -> Batch {
    let (rows, cols) = (ds.rows, ds.cols);
    let px = rows * cols;
    let mut images = vec![0.0f32; indices.len() * px];
    let mut labels = Vec::with_capacity(indices.len());
    for (dst, &i) in images.chunks_exact_mut(px.max(1)).zip(indices) {
        let src = ds.image(i);
        match shift.as_mut() {
            Some((rng, max)) => {
                let m = *max as isize;
                let span = 2 * *max + 1;
                let dx = rng.below(span) as isize - m;
                let dy = rng.below(span) as isize - m;
                shift_into(dst, src, rows, cols, dx, dy);
            }
            None => {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = f32::from(s) / 255.0;
                }
            }
        }
        labels.push(usize::from(ds.labels[i]));
    }
    Batch::single(images, labels, rows, cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_into_moves_right_and_down_and_zero_fills() {
        // 3x3 with pixel (y=0, x=0) = 255 and (y=2, x=2) = 255.
        let src = [255, 0, 0, 0, 0, 0, 0, 0, 255];
        let mut dst = [9.0f32; 9];
        shift_into(&mut dst, &src, 3, 3, 1, 2);
        // (0,0) moves to (y=2, x=1); (2,2) falls off.
        let mut want = [0.0f32; 9];
        want[2 * 3 + 1] = 1.0;
        assert_eq!(dst, want);
        shift_into(&mut dst, &src, 3, 3, -2, -2);
        let mut want = [0.0f32; 9];
        want[0] = 1.0;
        assert_eq!(dst, want);
        // A shift larger than the image leaves only zeros.
        shift_into(&mut dst, &src, 3, 3, 5, 0);
        assert_eq!(dst, [0.0; 9]);
    }

    #[test]
    fn synthetic_grid_puts_classes_in_distinct_cells() {
        let mut rng = Rng::new(1);
        let (images, labels) = synthetic_images(4, 8, 4, &mut rng);
        assert_eq!(labels, [0, 1, 2, 3]);
        // Class 0 is top-left, class 3 bottom-right.
        assert!(images[8 + 1] >= 200);
        assert!(images[3 * 64 + 6 * 8 + 6] >= 200);
        assert!(images[6 * 8 + 6] < 40);
    }
}
