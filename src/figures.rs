//! `capsnet figures --checkpoint CK --out DIR`: the paper's figures for a trained network, as
//! PNGs in DIR:
//!
//! - `reconstructions.png`: test images beside their reconstructions from the predicted
//!   capsule, correctly classified ones first, then misclassified ones (figure 3);
//! - `dimensions-<i>.png`: for test image i, each dimension of its predicted capsule moved by
//!   -0.25 to 0.25 in steps of 0.05 and decoded, a row per dimension (figure 4);
//! - `confusion.png` and `confusion.csv`: the confusion matrix on the test set;
//! - with `--multi`, `pairs.png`: overlapping pairs of test images (a network trained with
//!   `--multi`), each beside its two objects and their reconstructions from the two longest
//!   capsules, one object red-orange and the other green-blue (figure 5), pairs with both
//!   classes right first, then wrong ones; drawn at `--scale` 5 or more, so that captions of
//!   two class names fit under their cells.
//!
//! Images smaller than the model's input are placed on it as the translated test set (seed 0,
//! as `capsnet eval` does).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use capsnet_bench::pictures::{self, Picture, PictureGrid};
use capsnet_bench::plots;
use capsnet_core::checkpoint::Checkpoint;
use capsnet_core::inspect::{self, Predictions};
use capsnet_core::model::Workspace;
use capsnet_core::{CapsNet, data, train};
use clap::Args;

use crate::args::DataArgs;
use crate::exit::ConfigError;

/// The least scale of pairs.png, whose captions name two classes each.
const PAIR_MIN_SCALE: u32 = 5;

/// Fashion-MNIST's class names, in label order.
const FASHION_NAMES: [&str; 10] = [
    "T-shirt",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

#[derive(Args)]
pub struct FiguresArgs {
    /// A checkpoint file.
    #[arg(long, env = "CAPSNET_CHECKPOINT")]
    checkpoint: PathBuf,
    /// The folder to write the figures to (made if missing).
    #[arg(long, default_value = "figures")]
    out: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Correct and wrong examples shown in reconstructions.png, each.
    #[arg(long, default_value_t = 8, value_name = "N")]
    examples: usize,
    /// Test images to draw the dimension perturbations of (the first N classified correctly,
    /// of different classes where there are enough).
    #[arg(long, default_value_t = 3, value_name = "N")]
    perturb: usize,
    /// Use the first N test images only.
    #[arg(long, value_name = "N")]
    test_limit: Option<usize>,
    /// The class names for labels, comma-separated [default: Fashion-MNIST's for the
    /// fashion-mnist data set, else the class numbers].
    #[arg(long, value_delimiter = ',')]
    class_names: Vec<String>,
    /// Decode through the checkpoint's moving average of the weights (`ema.<name>`).
    #[arg(long)]
    ema: bool,
    /// Screen pixels per image pixel.
    #[arg(long, default_value_t = 3)]
    scale: u32,
    #[arg(long, env = "CAPSNET_THREADS")]
    threads: Option<usize>,
    /// The font of the text.
    #[arg(long, default_value = plots::FONT)]
    font: PathBuf,
    /// Also draw overlapping pairs of test images and each object's reconstruction from its
    /// capsule (pairs.png; for a network trained with --multi).
    #[arg(long)]
    multi: bool,
}

pub fn run(a: FiguresArgs) -> Result<()> {
    if a.examples == 0 && a.perturb == 0 {
        return Err(
            ConfigError("--examples and --perturb are both 0: nothing to draw".into()).into(),
        );
    }
    if a.test_limit == Some(0) || a.scale == 0 || a.scale > 16 {
        return Err(
            ConfigError("--test-limit and --scale (1-16) must be at least 1".into()).into(),
        );
    }
    let dir = a.data.resolve()?;
    let mut ck = Checkpoint::load(&a.checkpoint, None)?;
    if a.ema {
        ck.params.data = ck.ema.take().ok_or_else(|| {
            ConfigError(format!(
                "{} holds no weight average; it was trained without --ema-decay",
                a.checkpoint.display()
            ))
        })?;
    }
    if ck.baseline.is_some() {
        return Err(ConfigError(format!(
            "{} holds the CNN baseline, which has no capsules to draw; `capsnet eval` scores it",
            a.checkpoint.display()
        ))
        .into());
    }
    let cfg = ck.config.clone();
    let names = class_names(&a, &dir, cfg.classes)?;
    let model = CapsNet::new(cfg.clone())?;
    let raw = train::load_test_split(&cfg, &dir, a.test_limit)?;
    let (test, translated) = train::model_test_set(
        &raw,
        cfg.image_size,
        capsnet_core::canvas::TEST_PLACEMENT_SEED,
    )?;
    let threads = a.threads.unwrap_or_else(train::default_threads);
    let pool = train::build_pool(threads)?;
    let mut ws = Workspace::new();
    let p = pool.install(|| inspect::predict_all(&model, &ck.params, &test, 128, &mut ws))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let side = cfg.image_size;
    let set = if translated {
        format!("translated test set ({side}x{side})")
    } else {
        "test set".into()
    };
    println!(
        "{}: accuracy {:.2}% on {} images of the {set}",
        a.checkpoint.display(),
        100.0 * p.accuracy(),
        p.len()
    );

    let picture = |v: &[f32]| Picture::grey(side, side, v);
    if a.examples > 0 {
        let pick = |right: bool| -> Vec<usize> {
            (0..p.len())
                .filter(|&i| (p.predicted[i] == p.labels[i]) == right)
                .take(a.examples)
                .collect()
        };
        let (good, bad) = (pick(true), pick(false));
        let which: Vec<usize> = good.iter().chain(&bad).copied().collect();
        let rec = pool.install(|| inspect::reconstructions(&model, &ck.params, &p, &which))?;
        let px = side * side;
        let mut cells = vec![];
        for (k, &i) in which.iter().enumerate() {
            let mark = if p.predicted[i] == p.labels[i] {
                "right"
            } else {
                "wrong"
            };
            cells.push((
                picture(test.image_f32(i).as_slice()),
                format!("#{i} {}", names[p.labels[i]]),
            ));
            cells.push((
                picture(&rec[k * px..(k + 1) * px]),
                format!("{mark}: {}", names[p.predicted[i]]),
            ));
        }
        let grid = PictureGrid {
            title: format!(
                "Test images and their reconstructions from the predicted capsule: {} right, then {} wrong",
                good.len(),
                bad.len()
            ),
            col_heads: ["image", "reconstruction"]
                .iter()
                .cycle()
                .take(8)
                .map(|s| s.to_string())
                .collect(),
            row_heads: vec![],
            cells,
            cols: 8,
            scale: a.scale,
        };
        write_grid(&a, "reconstructions.png", &grid)?;
    }
    for i in perturbed(&p, a.perturb) {
        let deltas = inspect::figure4_deltas();
        let grid = pool.install(|| inspect::perturbations(&model, &ck.params, &p, i, &deltas))?;
        let px = side * side;
        let grid = PictureGrid {
            title: format!(
                "Test image #{i} ({}): each dimension of its capsule moved by -0.25 to 0.25",
                names[p.labels[i]]
            ),
            col_heads: deltas.iter().map(|d| format!("{d:+.2}")).collect(),
            row_heads: (0..p.dim).map(|d| format!("dim {d}")).collect(),
            cells: grid
                .chunks_exact(px)
                .map(|v| (picture(v), String::new()))
                .collect(),
            cols: deltas.len(),
            scale: a.scale,
        };
        write_grid(&a, &format!("dimensions-{i}.png"), &grid)?;
    }
    write_confusion(&a, &names, &p, &set)?;
    if a.multi {
        pool.install(|| draw_pairs(&a, &model, &ck.params, raw, &names))?;
    }
    Ok(())
}

/// `pairs.png`: the test pairs of `raw` through the network, `a.examples` right and wrong.
fn draw_pairs(
    a: &FiguresArgs,
    model: &CapsNet,
    params: &capsnet_core::Params,
    raw: data::Dataset,
    names: &[String],
) -> Result<()> {
    let side = model.config().image_size;
    let shift = train::pair_shift_for(&raw, side)?;
    let set = train::TestSet::Pairs { split: raw, shift };
    let mut ws = Workspace::new();
    let idx: Vec<usize> = (0..set.len()).collect();
    let batches = idx.chunks(128).map(|c| set.batch(c));
    let p = inspect::predict_pairs(model, params, batches, &mut ws)?;
    println!(
        "overlapping pairs ({side}x{side}, shifts up to {shift}): both classes right on {:.2}% of \
         {} pairs",
        100.0 * p.accuracy(),
        p.len()
    );
    let n = a.examples.max(1);
    let pick = |right: bool| -> Vec<usize> {
        (0..p.len())
            .filter(|&i| p.right(i) == right)
            .take(n)
            .collect()
    };
    let (good, bad) = (pick(true), pick(false));
    let which: Vec<usize> = good.iter().chain(&bad).copied().collect();
    let rec = inspect::pair_reconstructions(model, params, &p, &which)?;
    let batch = set.batch(&which);
    let (px, m) = (side * side, which.len());
    let part = |o: usize, k: usize| &batch.parts[(o * m + k) * px..][..px];
    let name = |c: usize| names[c].as_str();
    let mut cells = vec![];
    for (k, &i) in which.iter().enumerate() {
        let ([l0, l1], [p0, p1]) = (p.labels[i], p.predicted[i]);
        let mark = if p.right(i) { "right" } else { "wrong" };
        cells.push((
            Picture::grey(side, side, &batch.images[k * px..][..px]),
            format!("#{i}"),
        ));
        cells.push((
            Picture::two_colours(side, side, part(0, k), part(1, k)),
            format!("{} + {}", name(l0), name(l1)),
        ));
        let r = &rec[2 * k * px..][..2 * px];
        cells.push((
            Picture::two_colours(side, side, &r[..px], &r[px..]),
            format!("{mark}: {} + {}", name(p0), name(p1)),
        ));
    }
    let grid = PictureGrid {
        title: format!(
            "Pairs and their two longest capsules decoded: {} right, then {} wrong",
            good.len(),
            bad.len()
        ),
        col_heads: ["pair", "objects", "reconstructed"]
            .iter()
            .cycle()
            .take(6)
            .map(|s| s.to_string())
            .collect(),
        row_heads: vec![],
        cells,
        cols: 6,
        // Captions name two classes: cells narrower than about 160 px would run them together.
        scale: a.scale.max(PAIR_MIN_SCALE),
    };
    write_grid(a, "pairs.png", &grid)
}

/// The first `n` correctly classified images, one per class while classes last.
fn perturbed(p: &Predictions, n: usize) -> Vec<usize> {
    let right: Vec<usize> = (0..p.len())
        .filter(|&i| p.predicted[i] == p.labels[i])
        .collect();
    let mut out: Vec<usize> = vec![];
    for &i in &right {
        if out.len() < n && !out.iter().any(|&j| p.labels[j] == p.labels[i]) {
            out.push(i);
        }
    }
    for &i in &right {
        if out.len() < n && !out.contains(&i) {
            out.push(i);
        }
    }
    out.sort_unstable();
    out
}

fn write_grid(a: &FiguresArgs, name: &str, grid: &PictureGrid) -> Result<()> {
    let path = a.out.join(name);
    pictures::draw_grid(&path, &a.font, grid)?;
    let (w, h) = grid.size();
    println!("wrote {} ({w}x{h})", path.display());
    Ok(())
}

fn write_confusion(a: &FiguresArgs, names: &[String], p: &Predictions, set: &str) -> Result<()> {
    let counts = p.confusion();
    let k = names.len();
    let mut csv = String::from("true\\predicted");
    for n in names {
        let _ = write!(csv, ",{n}");
    }
    csv.push('\n');
    for (t, row) in counts.chunks_exact(k).enumerate() {
        csv.push_str(&names[t]);
        for c in row {
            let _ = write!(csv, ",{c}");
        }
        csv.push('\n');
    }
    let path = a.out.join("confusion.csv");
    std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;
    let path = a.out.join("confusion.png");
    let title = format!(
        "Confusion on the {set}: rows true, columns predicted ({:.2}% right)",
        100.0 * p.accuracy()
    );
    pictures::draw_confusion(&path, &a.font, &title, names, &counts)?;
    let (w, h) = pictures::confusion_size(k);
    println!("wrote {} ({w}x{h}) and confusion.csv", path.display());
    Ok(())
}

fn class_names(a: &FiguresArgs, dir: &Path, classes: usize) -> Result<Vec<String>> {
    if !a.class_names.is_empty() {
        if a.class_names.len() != classes {
            return Err(ConfigError(format!(
                "--class-names gives {} names for {classes} classes",
                a.class_names.len()
            ))
            .into());
        }
        return Ok(a.class_names.clone());
    }
    let fashion = dir == Path::new(data::FASHION_MNIST_DIR)
        || dir.file_name().is_some_and(|n| n == "fashion-mnist");
    Ok(if fashion && classes == FASHION_NAMES.len() {
        FASHION_NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        (0..classes).map(|c| c.to_string()).collect()
    })
}
