//! IDX loading, checking and batching, through the public API of `capsnet_core::data`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

use std::path::{Path, PathBuf};

use capsnet_core::data::{
    self, Dataset, FASHION_MNIST_DIR, ImageSize, Split, epoch_permutation, load_idx_pair,
    load_split, make_batch, resolve_data_dir, resolve_data_dir_in, split_paths, write_idx_images,
    write_idx_labels, write_synthetic,
};
use capsnet_core::error::CoreError;
use capsnet_core::rng::Rng;

/// Three 4x4 images whose pixels are `i * 16 + p` and labels 0, 1, 2.
fn sample() -> (Vec<u8>, Vec<u8>) {
    let images = (0..3 * 16).map(|p| p as u8).collect();
    (images, vec![0, 1, 2])
}

fn write_pair(dir: &Path, ext: &str) -> (PathBuf, PathBuf) {
    let (images, labels) = sample();
    let ip = dir.join(format!("images{ext}"));
    let lp = dir.join(format!("labels{ext}"));
    write_idx_images(&ip, &images, 3, 4, 4).unwrap();
    write_idx_labels(&lp, &labels).unwrap();
    (ip, lp)
}

/// Asserts the error message names `file` (by its file name) and contains every needle.
fn assert_err_mentions(err: CoreError, file: &Path, needles: &[&str]) {
    let msg = err.to_string();
    let name = file.file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(name), "error {msg:?} does not name {name}");
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
}

fn raw_images_header(n: u32, rows: u32, cols: u32) -> Vec<u8> {
    [0x0000_0803u32, n, rows, cols]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect()
}

#[test]
fn round_trip_raw_and_gz() {
    let tmp = tempfile::tempdir().unwrap();
    let (images, labels) = sample();
    for ext in ["", ".gz"] {
        let (ip, lp) = write_pair(tmp.path(), ext);
        let raw = std::fs::read(&ip).unwrap();
        // Gzip is written exactly when the name says so (and read by magic, not by name).
        assert_eq!(raw.starts_with(&[0x1f, 0x8b]), ext == ".gz");
        let ds = load_idx_pair(&ip, &lp, 3, ImageSize::Exactly(4)).unwrap();
        assert_eq!((ds.len(), ds.rows, ds.cols, ds.classes), (3, 4, 4, 3));
        assert_eq!(ds.images, images);
        assert_eq!(ds.labels, labels);
        assert_eq!(ds.image(1), &images[16..32]);
    }
}

#[test]
fn gzip_is_detected_by_magic_not_extension() {
    let tmp = tempfile::tempdir().unwrap();
    let (gz_images, gz_labels) = write_pair(tmp.path(), ".gz");
    let ip = tmp.path().join("plain-name-images");
    let lp = tmp.path().join("plain-name-labels");
    std::fs::rename(gz_images, &ip).unwrap();
    std::fs::rename(gz_labels, &lp).unwrap();
    let ds = load_idx_pair(&ip, &lp, 3, ImageSize::Exactly(4)).unwrap();
    assert_eq!(ds.images, sample().0);
}

#[test]
fn truncate_keeps_first_n_and_tolerates_large_n() {
    let tmp = tempfile::tempdir().unwrap();
    let (ip, lp) = write_pair(tmp.path(), "");
    let mut ds: Dataset = load_idx_pair(&ip, &lp, 3, ImageSize::Exactly(4)).unwrap();
    ds.truncate(10);
    assert_eq!(ds.len(), 3);
    ds.truncate(2);
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.images.len(), 2 * 16);
    assert_eq!(ds.labels, [0, 1]);
    ds.truncate(0);
    assert!(ds.is_empty());
}

#[test]
fn missing_file_is_io_error_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, lp) = write_pair(tmp.path(), "");
    let missing = tmp.path().join("no-such-images");
    let err = load_idx_pair(&missing, &lp, 3, ImageSize::Exactly(4)).unwrap_err();
    assert!(matches!(err, CoreError::Io { .. }), "{err:?}");
    assert_err_mentions(err, &missing, &[]);
}

#[test]
fn bad_magic_says_found_and_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, lp) = write_pair(tmp.path(), "");
    let ip = tmp.path().join("garbage");
    let mut bytes = raw_images_header(3, 4, 4);
    bytes[2] = 0x0d; // 0x00000d03: not an IDX u8 file
    bytes.extend_from_slice(&[0; 48]);
    std::fs::write(&ip, bytes).unwrap();
    let err = load_idx_pair(&ip, &lp, 3, ImageSize::Exactly(4)).unwrap_err();
    assert!(matches!(err, CoreError::Data { .. }), "{err:?}");
    assert_err_mentions(err, &ip, &["bad magic", "0x00000d03", "0x00000803"]);
}

#[test]
fn swapped_files_get_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let (ip, lp) = write_pair(tmp.path(), ".gz");
    let err = load_idx_pair(&lp, &ip, 3, ImageSize::Exactly(4)).unwrap_err();
    assert_err_mentions(err, &lp, &["0x00000801", "0x00000803", "swapped"]);
}

#[test]
fn truncated_images_say_expected_and_actual_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, lp) = write_pair(tmp.path(), "");
    let ip = tmp.path().join("short-images");
    let mut bytes = raw_images_header(3, 4, 4);
    bytes.extend_from_slice(&[0; 40]); // 48 expected
    std::fs::write(&ip, bytes).unwrap();
    let err = load_idx_pair(&ip, &lp, 3, ImageSize::Exactly(4)).unwrap_err();
    assert_err_mentions(err, &ip, &["truncated", "48 bytes", "only 40 bytes"]);
}

#[test]
fn truncated_header_and_labels_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (ip, _) = write_pair(tmp.path(), "");
    let short = tmp.path().join("short-header");
    std::fs::write(&short, &raw_images_header(3, 4, 4)[..10]).unwrap();
    let (_, lp) = write_pair(tmp.path(), "");
    let err = load_idx_pair(&short, &lp, 3, ImageSize::Exactly(4)).unwrap_err();
    assert_err_mentions(err, &short, &["truncated", "16 bytes", "has 10"]);

    let labels = tmp.path().join("short-labels");
    let mut bytes: Vec<u8> = [0x0000_0801u32, 3]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    bytes.push(0);
    std::fs::write(&labels, bytes).unwrap();
    let err = load_idx_pair(&ip, &labels, 3, ImageSize::Exactly(4)).unwrap_err();
    assert_err_mentions(
        err,
        &labels,
        &["truncated", "3 labels (3 bytes)", "only 1 bytes"],
    );
}

#[test]
fn count_mismatch_names_both_files_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let (ip, _) = write_pair(tmp.path(), "");
    let lp = tmp.path().join("two-labels");
    write_idx_labels(&lp, &[0, 1]).unwrap();
    let err = load_idx_pair(&ip, &lp, 3, ImageSize::Exactly(4)).unwrap_err();
    assert_err_mentions(
        err,
        &ip,
        &["two-labels", "3 images", "2 labels", "mismatch"],
    );
}

#[test]
fn label_out_of_range_names_index_value_and_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let (ip, _) = write_pair(tmp.path(), "");
    let lp = tmp.path().join("bad-labels");
    write_idx_labels(&lp, &[0, 1, 7]).unwrap();
    let err = load_idx_pair(&ip, &lp, 3, ImageSize::Exactly(4)).unwrap_err();
    assert_err_mentions(
        err,
        &lp,
        &["out of range", "index 2", "value 7", "3 classes"],
    );
}

#[test]
fn wrong_image_size_says_expected_and_found() {
    let tmp = tempfile::tempdir().unwrap();
    let (ip, lp) = write_pair(tmp.path(), "");
    let err = load_idx_pair(&ip, &lp, 3, ImageSize::Exactly(28)).unwrap_err();
    assert_err_mentions(err, &ip, &["image size", "expected 28x28", "found 4x4"]);
}

#[test]
fn corrupt_gzip_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (ip, lp) = write_pair(tmp.path(), ".gz");
    // Keep the gzip magic but damage the deflate stream and cut the trailer.
    let mut bytes = std::fs::read(&ip).unwrap();
    let len = bytes.len();
    for b in &mut bytes[10..len - 8] {
        *b ^= 0xa5;
    }
    bytes.truncate(len - 4);
    let bad = tmp.path().join("corrupt-images.gz");
    std::fs::write(&bad, bytes).unwrap();
    let err = load_idx_pair(&bad, &lp, 3, ImageSize::Exactly(4)).unwrap_err();
    assert!(matches!(err, CoreError::Data { .. }), "{err:?}");
    assert_err_mentions(err, &bad, &["gzip"]);

    // A stream cut short is caught too.
    let cut = tmp.path().join("cut-images.gz");
    std::fs::write(&cut, &std::fs::read(&ip).unwrap()[..20]).unwrap();
    let err = load_idx_pair(&cut, &lp, 3, ImageSize::Exactly(4)).unwrap_err();
    assert_err_mentions(err, &cut, &["gzip"]);
}

#[test]
fn split_paths_prefers_raw_accepts_gz_and_dotted_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (images, labels) = sample();
    write_idx_images(&dir.join("t10k-images-idx3-ubyte.gz"), &images, 3, 4, 4).unwrap();
    write_idx_labels(&dir.join("t10k-labels.idx1-ubyte"), &labels).unwrap();
    let (ip, lp) = split_paths(dir, Split::Test).unwrap();
    assert_eq!(ip, dir.join("t10k-images-idx3-ubyte.gz"));
    assert_eq!(lp, dir.join("t10k-labels.idx1-ubyte"));

    // Raw wins over .gz when both exist.
    write_idx_images(&dir.join("t10k-images-idx3-ubyte"), &images, 3, 4, 4).unwrap();
    assert_eq!(
        split_paths(dir, Split::Test).unwrap().0,
        dir.join("t10k-images-idx3-ubyte")
    );
    assert_eq!(load_split(dir, Split::Test, 3, 4).unwrap().labels, labels);

    // The train split is missing: the error names the file and the folder.
    let err = split_paths(dir, Split::Train).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CoreError::Io { .. }), "{err:?}");
    assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
}

#[test]
fn resolve_data_dir_prefers_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let empty_root = tempfile::tempdir().unwrap();
    // data_dir wins over any preset, even an unknown one.
    let got = resolve_data_dir_in(Some("nope"), Some(tmp.path()), empty_root.path()).unwrap();
    assert_eq!(got, tmp.path());
    let got = resolve_data_dir(None, Some(tmp.path())).unwrap();
    assert_eq!(got, tmp.path());
    // A data_dir that does not exist is reported with its path.
    let gone = tmp.path().join("gone");
    let err = resolve_data_dir(None, Some(&gone)).unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
}

#[test]
fn resolve_data_dir_unknown_preset_lists_known_ones() {
    let root = tempfile::tempdir().unwrap();
    let err = resolve_data_dir_in(Some("cifar-10"), None, root.path()).unwrap_err();
    assert!(matches!(err, CoreError::Config(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("cifar-10") && msg.contains("fashion-mnist"),
        "{msg}"
    );
    let err = resolve_data_dir_in(None, None, root.path()).unwrap_err();
    assert!(err.to_string().contains("fashion-mnist"), "{err}");
}

#[test]
fn resolve_data_dir_missing_preset_says_how_to_install() {
    let root = tempfile::tempdir().unwrap();
    let err = resolve_data_dir_in(Some("fashion-mnist"), None, root.path()).unwrap_err();
    assert!(matches!(err, CoreError::DatasetMissing { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("apt-get install dataset-fashion-mnist"),
        "{err}"
    );
    // An incomplete install (test split only) is still missing.
    let dir = root.path().join("fashion-mnist");
    write_synthetic(&dir, 0, 2, 4, 2, 1).unwrap();
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    assert!(resolve_data_dir_in(Some("fashion-mnist"), None, root.path()).is_err());
    // Once complete it resolves to ROOT/fashion-mnist.
    write_synthetic(&dir, 2, 2, 4, 2, 1).unwrap();
    let got = resolve_data_dir_in(Some("fashion-mnist"), None, root.path()).unwrap();
    assert_eq!(got, dir);
    assert_eq!(
        Path::new(data::DATASETS_ROOT).join("fashion-mnist"),
        Path::new(FASHION_MNIST_DIR)
    );
}

#[test]
fn synthetic_is_deterministic_and_loadable() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    write_synthetic(a.path(), 20, 10, 12, 4, 42).unwrap();
    write_synthetic(b.path(), 20, 10, 12, 4, 42).unwrap();
    let train = load_split(a.path(), Split::Train, 4, 12).unwrap();
    let test = load_split(a.path(), Split::Test, 4, 12).unwrap();
    assert_eq!((train.len(), test.len()), (20, 10));
    assert_eq!(&train.labels[..6], &[0, 1, 2, 3, 0, 1]);
    assert_eq!(
        train.images,
        load_split(b.path(), Split::Train, 4, 12).unwrap().images
    );
    // Train and test are different draws; a different seed gives different noise.
    assert_ne!(&train.images[..144], &test.images[..144]);
    let c = tempfile::tempdir().unwrap();
    write_synthetic(c.path(), 20, 10, 12, 4, 43).unwrap();
    assert_ne!(
        train.images,
        load_split(c.path(), Split::Train, 4, 12).unwrap().images
    );
    // Same class, different samples: the bright pattern sits in the same place.
    let bright = |img: &[u8]| -> Vec<usize> { (0..144).filter(|&p| img[p] >= 200).collect() };
    assert!(!bright(train.image(0)).is_empty());
    assert_eq!(bright(train.image(0)), bright(train.image(4)));
    assert_ne!(bright(train.image(0)), bright(train.image(1)));
}

#[test]
fn epoch_permutation_is_deterministic_and_differs_by_epoch() {
    let p0 = epoch_permutation(100, 7, 0);
    assert_eq!(p0, epoch_permutation(100, 7, 0));
    assert_ne!(p0, epoch_permutation(100, 7, 1));
    assert_ne!(p0, epoch_permutation(100, 8, 0));
    let mut sorted = p0.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    assert!(epoch_permutation(0, 7, 0).is_empty());
}

fn dataset_with(images: Vec<u8>, labels: Vec<u8>, size: usize) -> Dataset {
    Dataset {
        images,
        labels,
        rows: size,
        cols: size,
        classes: 10,
    }
}

#[test]
fn make_batch_without_shift_scales_exactly() {
    let (images, labels) = sample();
    let ds = dataset_with(images.clone(), labels, 4);
    let batch = make_batch(&ds, &[2, 0], None);
    assert_eq!((batch.len(), batch.rows, batch.cols), (2, 4, 4));
    assert_eq!(batch.labels, [2, 0]);
    let want: Vec<f32> = images[32..48]
        .iter()
        .chain(&images[0..16])
        .map(|&p| f32::from(p) / 255.0)
        .collect();
    assert_eq!(batch.images, want);
    assert!(make_batch(&ds, &[], None).is_empty());
}

#[test]
fn make_batch_shift_moves_content_and_zero_fills() {
    // One bright pixel at (y=5, x=6) in a 12x12 image, everything else 0.
    let size = 12;
    let (py, px) = (5usize, 6usize);
    let mut img = vec![0u8; size * size];
    img[py * size + px] = 255;
    let n = 64;
    let ds = dataset_with(img.repeat(n), vec![3; n], size);
    let idx: Vec<usize> = (0..n).collect();
    let mut rng = Rng::derive(9, "augment", 0);
    let batch = make_batch(&ds, &idx, Some((&mut rng, 2)));
    let mut offsets = std::collections::HashSet::new();
    for b in 0..n {
        let out = &batch.images[b * size * size..(b + 1) * size * size];
        let lit: Vec<usize> = (0..size * size).filter(|&p| out[p] != 0.0).collect();
        // The pixel survives exactly once, at full value, everything else zero-filled.
        assert_eq!(lit.len(), 1, "image {b}: {lit:?}");
        assert_eq!(out[lit[0]], 1.0);
        let (y, x) = ((lit[0] / size) as isize, (lit[0] % size) as isize);
        let (dy, dx) = (y - py as isize, x - px as isize);
        assert!(
            dy.abs() <= 2 && dx.abs() <= 2,
            "image {b}: moved by ({dx}, {dy})"
        );
        offsets.insert((dx, dy));
    }
    // With 64 draws from 25 offsets the shift is not stuck at zero and covers most of the range.
    assert!(offsets.len() > 10, "{offsets:?}");

    // A pixel at the border can be pushed off the image: then the output is all zeros.
    let mut corner = vec![0u8; size * size];
    corner[0] = 255;
    let ds = dataset_with(corner.repeat(n), vec![0; n], size);
    let batch = make_batch(&ds, &idx, Some((&mut Rng::derive(9, "augment", 1), 2)));
    let empty = (0..n)
        .filter(|b| {
            batch.images[b * size * size..(b + 1) * size * size]
                .iter()
                .all(|&v| v == 0.0)
        })
        .count();
    assert!(empty > 0 && empty < n, "{empty} of {n} images empty");
}

#[test]
fn make_batch_shift_is_deterministic_for_a_seed() {
    let tmp = tempfile::tempdir().unwrap();
    write_synthetic(tmp.path(), 16, 0, 10, 4, 5).unwrap();
    let ds = load_split(tmp.path(), Split::Train, 4, 10).unwrap();
    let idx: Vec<usize> = (0..16).collect();
    let run = |stream_index| {
        let mut rng = Rng::derive(5, "augment", stream_index);
        make_batch(&ds, &idx, Some((&mut rng, 2))).images
    };
    assert_eq!(run(0), run(0));
    assert_ne!(run(0), run(1));
    // max_shift 0 is the identity.
    let mut rng = Rng::new(1);
    assert_eq!(
        make_batch(&ds, &idx, Some((&mut rng, 0))).images,
        make_batch(&ds, &idx, None).images
    );
}

/// The real data set, where `scripts/setup` installs it. Ignored by a plain `cargo test`, run by
/// `scripts/test` (`--include-ignored`), and then it fails if the data set is missing rather
/// than passing without looking at it.
#[test]
#[ignore = "needs dataset-fashion-mnist (scripts/setup installs it)"]
fn fashion_mnist_test_split() {
    let dir = Path::new(FASHION_MNIST_DIR);
    let ds = load_split(dir, Split::Test, 10, 28).unwrap_or_else(|e| {
        panic!(
            "the Fashion-MNIST test split in {FASHION_MNIST_DIR}: {e} (scripts/setup installs \
             dataset-fashion-mnist)"
        )
    });
    assert_eq!((ds.len(), ds.rows, ds.cols), (10_000, 28, 28));
    assert_eq!(ds.images.len(), 10_000 * 784);
    assert!(ds.labels.iter().all(|&l| l < 10));
    // Every class is present (the test split is balanced, 1000 each).
    let mut counts = [0usize; 10];
    for &l in &ds.labels {
        counts[usize::from(l)] += 1;
    }
    assert_eq!(counts, [1000; 10]);
}
