//! Figures made of small images (`capsnet figures`): a grid of pictures with headings and
//! captions, and a confusion matrix. PNG, text drawn with the font of [`crate::plots`].
//!
//! # Layout of a grid
//!
//! Every picture is drawn at `scale` screen pixels per image pixel. A cell is the picture plus
//! [`CAPTION_H`] below it when any cell has a caption, plus [`GAP`] on the right and below. The
//! grid starts [`GAP`] from the left, after a [`ROW_HEAD_W`] column when rows have headings, and
//! below a [`TITLE_H`] title and a [`HEAD_H`] row of column headings when there are any. So a
//! grid of `r x c` pictures of `w x h` measures
//! `(GAP + row_head + c (w scale + GAP), TITLE_H + col_head + r (h scale + caption + GAP))`.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::plots::use_font;
use crate::{BenchError, Result};

pub const TITLE_H: u32 = 30;
pub const HEAD_H: u32 = 18;
pub const ROW_HEAD_W: u32 = 70;
pub const CAPTION_H: u32 = 16;
pub const GAP: u32 = 6;

/// A small image, one colour per pixel, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Picture {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<[u8; 3]>,
}

fn level(v: f32) -> u8 {
    // Clamped to [0, 255] first, so the cast only drops the fraction.
    (v * 255.0).round().clamp(0.0, 255.0) as u8
}

impl Picture {
    /// Grey levels in [0, 1] (values outside are clamped): 0 black, 1 white.
    pub fn grey(width: usize, height: usize, v: &[f32]) -> Self {
        Picture {
            width,
            height,
            rgb: v.iter().map(|&x| [level(x); 3]).collect(),
        }
    }

    /// Two grey images in two colours over black, added (the paper's figure 5): `a` in
    /// red-orange, `b` in green-blue.
    pub fn two_colours(width: usize, height: usize, a: &[f32], b: &[f32]) -> Self {
        Picture {
            width,
            height,
            rgb: a
                .iter()
                .zip(b)
                .map(|(&a, &b)| [level(a), level(0.6 * a + 0.6 * b), level(b)])
                .collect(),
        }
    }
}

/// Pictures in rows and columns with a title, optional headings and captions.
pub struct PictureGrid {
    pub title: String,
    /// Headings above the columns (empty: none).
    pub col_heads: Vec<String>,
    /// Headings left of the rows (empty: none).
    pub row_heads: Vec<String>,
    /// Row-major cells: a picture and the caption under it ("" for none).
    pub cells: Vec<(Picture, String)>,
    pub cols: usize,
    pub scale: u32,
}

impl PictureGrid {
    fn cell(&self) -> (u32, u32, u32) {
        let (w, h) = self
            .cells
            .first()
            .map_or((0, 0), |(p, _)| (p.width as u32, p.height as u32));
        let caption = if self.cells.iter().any(|(_, c)| !c.is_empty()) {
            CAPTION_H
        } else {
            0
        };
        (w * self.scale, h * self.scale, caption)
    }

    fn rows(&self) -> u32 {
        self.cells.len().div_ceil(self.cols.max(1)) as u32
    }

    fn origin(&self) -> (u32, u32) {
        let rh = if self.row_heads.is_empty() {
            0
        } else {
            ROW_HEAD_W
        };
        let ch = if self.col_heads.is_empty() { 0 } else { HEAD_H };
        (GAP + rh, TITLE_H + ch)
    }

    /// The image's size in pixels (the module documentation gives the formula).
    pub fn size(&self) -> (u32, u32) {
        let (w, h, caption) = self.cell();
        let (x0, y0) = self.origin();
        (
            x0 + self.cols.max(1) as u32 * (w + GAP),
            y0 + self.rows() * (h + caption + GAP),
        )
    }
}

fn plot_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> BenchError + '_ {
    move |e| BenchError::Settings(format!("drawing {}: {e}", path.display()))
}

/// Writes `grid` as a PNG at `path`.
pub fn draw_grid(path: &Path, font: &Path, grid: &PictureGrid) -> Result<()> {
    if grid.cells.iter().any(|(p, _)| {
        p.rgb.len() != p.width * p.height
            || Some((p.width, p.height)) != grid.cells.first().map(|(q, _)| (q.width, q.height))
    }) {
        return Err(BenchError::Settings(format!(
            "drawing {}: the pictures of a grid must all have the same size",
            path.display()
        )));
    }
    use_font(font)?;
    let root = BitMapBackend::new(path, grid.size()).into_drawing_area();
    let e = plot_err(path);
    grid_on(&root, grid).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

fn grid_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    g: &PictureGrid,
) -> std::result::Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (w, h, caption) = g.cell();
    let (x0, y0) = g.origin();
    let centred = |size| {
        ("sans-serif", size)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center))
    };
    let width = g.size().0;
    root.draw(&Text::new(
        g.title.clone(),
        ((width / 2) as i32, (TITLE_H / 2) as i32),
        centred(17),
    ))
    .map_err(|x| e(&x))?;
    for (c, head) in g.col_heads.iter().enumerate().take(g.cols) {
        let x = x0 + c as u32 * (w + GAP) + w / 2;
        root.draw(&Text::new(
            head.clone(),
            (x as i32, (TITLE_H + HEAD_H / 2) as i32),
            centred(12),
        ))
        .map_err(|x| e(&x))?;
    }
    for (r, head) in g.row_heads.iter().enumerate() {
        let y = y0 + r as u32 * (h + caption + GAP) + h / 2;
        root.draw(&Text::new(
            head.clone(),
            ((GAP + ROW_HEAD_W / 2) as i32, y as i32),
            centred(12),
        ))
        .map_err(|x| e(&x))?;
    }
    let s = g.scale as i32;
    for (i, (pic, text)) in g.cells.iter().enumerate() {
        let (r, c) = ((i / g.cols.max(1)) as u32, (i % g.cols.max(1)) as u32);
        let (px, py) = (
            (x0 + c * (w + GAP)) as i32,
            (y0 + r * (h + caption + GAP)) as i32,
        );
        for (k, &[red, green, blue]) in pic.rgb.iter().enumerate() {
            let (x, y) = ((k % pic.width) as i32, (k / pic.width) as i32);
            root.draw(&Rectangle::new(
                [
                    (px + x * s, py + y * s),
                    (px + (x + 1) * s, py + (y + 1) * s),
                ],
                RGBColor(red, green, blue).filled(),
            ))
            .map_err(|x| e(&x))?;
        }
        if !text.is_empty() {
            root.draw(&Text::new(
                text.clone(),
                (px + (w / 2) as i32, py + h as i32 + (CAPTION_H / 2) as i32),
                centred(11),
            ))
            .map_err(|x| e(&x))?;
        }
    }
    Ok(())
}

/// Side of one cell of the confusion matrix, in pixels.
pub const CONFUSION_CELL: u32 = 46;
/// Room for the class names left of and above the matrix.
pub const CONFUSION_LABELS: u32 = 110;

/// The size of a confusion matrix of `k` classes.
pub fn confusion_size(k: usize) -> (u32, u32) {
    let side = CONFUSION_LABELS + k as u32 * CONFUSION_CELL + GAP;
    (side, side + TITLE_H)
}

/// Writes a `k x k` confusion matrix (`counts[true * k + predicted]`) as a PNG: each cell holds
/// its count, shaded by its share of the true class's row.
pub fn draw_confusion(
    path: &Path,
    font: &Path,
    title: &str,
    names: &[String],
    counts: &[u64],
) -> Result<()> {
    let k = names.len();
    if counts.len() != k * k {
        return Err(BenchError::Settings(format!(
            "drawing {}: {} counts for {k} classes",
            path.display(),
            counts.len()
        )));
    }
    use_font(font)?;
    let root = BitMapBackend::new(path, confusion_size(k)).into_drawing_area();
    let e = plot_err(path);
    confusion_on(&root, title, names, counts).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

fn confusion_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    names: &[String],
    counts: &[u64],
) -> std::result::Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let k = names.len();
    let cell = CONFUSION_CELL as i32;
    let (x0, y0) = (CONFUSION_LABELS as i32, (TITLE_H + CONFUSION_LABELS) as i32);
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let font = |size, h, v| {
        ("sans-serif", size)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(h, v))
    };
    let (w, _) = confusion_size(k);
    root.draw(&Text::new(
        title.to_string(),
        ((w / 2) as i32, (TITLE_H / 2) as i32),
        font(17, HPos::Center, VPos::Center),
    ))
    .map_err(|x| e(&x))?;
    for (i, name) in names.iter().enumerate() {
        let mid = i as i32 * cell + cell / 2;
        root.draw(&Text::new(
            name.clone(),
            (x0 - 6, y0 + mid),
            font(12, HPos::Right, VPos::Center),
        ))
        .map_err(|x| e(&x))?;
        root.draw(&Text::new(
            name.clone(),
            (x0 + mid, y0 - 6),
            ("sans-serif", 12)
                .into_font()
                .transform(FontTransform::Rotate270)
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(|x| e(&x))?;
    }
    for t in 0..k {
        let row = &counts[t * k..(t + 1) * k];
        let total = row.iter().sum::<u64>().max(1) as f64;
        for (p, &n) in row.iter().enumerate() {
            let share = n as f64 / total;
            let shade = |full: f64| (255.0 - share * (255.0 - full)).round() as u8;
            let (x, y) = (x0 + p as i32 * cell, y0 + t as i32 * cell);
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                RGBColor(shade(31.0), shade(119.0), shade(180.0)).filled(),
            ))
            .map_err(|x| e(&x))?;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                RGBColor(200, 200, 200),
            ))
            .map_err(|x| e(&x))?;
            let ink = if share > 0.5 { WHITE } else { BLACK };
            root.draw(&Text::new(
                n.to_string(),
                (x + cell / 2, y + cell / 2),
                ("sans-serif", 12)
                    .into_font()
                    .color(&ink)
                    .pos(Pos::new(HPos::Center, VPos::Center)),
            ))
            .map_err(|x| e(&x))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_measures_what_its_documentation_says() {
        let pic = Picture::grey(28, 20, &[0.5; 560]);
        let grid = PictureGrid {
            title: "t".into(),
            col_heads: vec!["a".into(); 3],
            row_heads: vec![],
            cells: vec![(pic, "c".into()); 7],
            cols: 3,
            scale: 2,
        };
        assert_eq!(
            grid.size(),
            (
                GAP + 3 * (56 + GAP),
                TITLE_H + HEAD_H + 3 * (40 + CAPTION_H + GAP)
            )
        );
    }

    #[test]
    fn two_colours_keep_each_image_in_its_own_channel() {
        let p = Picture::two_colours(2, 1, &[1.0, 0.0], &[0.0, 1.0]);
        assert_eq!(p.rgb, [[255, 153, 0], [0, 153, 255]]);
    }
}
