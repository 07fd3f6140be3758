//! A picture of who holds which labels: a nodes × classes heatmap of a
//! partition, the graphic counterpart of [`super::partition::label_report`].
//!
//! Rows are nodes (0 at the top), columns are classes, and a cell's colour
//! runs linearly from near-white (0 samples) to dark blue (the largest count
//! in the picture), so skew is visible at a glance; each picture is scaled
//! to its own largest count (the SVG prints the counts themselves).
//!
//! Output format follows the path's extension, `.svg` or `.png`:
//! * SVG carries all the text — the count in each cell (when cells are at
//!   least [`MIN_TEXT_CELL`] px), node and class indices, and the axis
//!   titles "node" and "class". SVG text is rendered by the viewer, so no
//!   font is needed here.
//! * PNG carries no text at all. Rasterising text would need a font: plotters'
//!   `ttf` feature loads system fonts through fontconfig/freetype (a C build
//!   and runtime dependency CI machines may lack), and `ab_glyph` needs a
//!   font file shipped in the repository. A heatmap is still readable
//!   without labels (row i is node i, column j class j, as in the SVG and
//!   the text report), so the PNG is the quick look and the SVG the
//!   document. plotters' default bitmap encoder would pull in the `image`
//!   crate; the raw RGB buffer goes to the `png` crate instead
//!   ([`encode_png`]), which is all of `image` this needs.
//!
//! Both formats share one layout ([`heatmap_dimensions`]), and the file is
//! written atomically (temporary file, then rename), so a viewer or a
//! concurrent run never sees half a picture.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{DataError, write_atomic};

/// Smallest cell side, in pixels, that gets its count written in it (SVG).
pub const MIN_TEXT_CELL: u32 = 18;
/// Cell side bounds, in pixels; between them cells shrink as the grid grows.
const MAX_CELL: u32 = 40;
const MIN_CELL: u32 = 6;
/// Margins around the grid: room for indices and axis titles.
const LEFT: u32 = 64;
const TOP: u32 = 12;
const RIGHT: u32 = 12;
const BOTTOM: u32 = 52;

/// Colour of a cell holding no samples, and of the largest count.
const LOW: (u8, u8, u8) = (247, 251, 255);
const HIGH: (u8, u8, u8) = (8, 48, 107);

/// Side of a cell for a grid of `nodes` × `classes`.
fn cell_side(nodes: usize, classes: usize) -> u32 {
    let longest = nodes.max(classes).max(1) as u32;
    (640 / longest).clamp(MIN_CELL, MAX_CELL)
}

/// Width and height, in pixels, of the picture of `nodes` × `classes` (both
/// formats; an SVG's are its `width`/`height`).
pub fn heatmap_dimensions(nodes: usize, classes: usize) -> (u32, u32) {
    let cell = cell_side(nodes, classes);
    (
        LEFT + classes as u32 * cell + RIGHT,
        TOP + nodes as u32 * cell + BOTTOM,
    )
}

/// Colour for `count` when the largest is `max`: linear from [`LOW`] to [`HIGH`].
fn colour(count: usize, max: usize) -> RGBColor {
    let t = if max == 0 {
        0.0
    } else {
        count as f64 / max as f64
    };
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * t).round() as u8;
    RGBColor(mix(LOW.0, HIGH.0), mix(LOW.1, HIGH.1), mix(LOW.2, HIGH.2))
}

/// Writes the heatmap of `parts` (sample indices per node into `labels`) to
/// `path`, as SVG or PNG by its extension.
pub fn label_heatmap(
    labels: &[u8],
    classes: usize,
    parts: &[Vec<usize>],
    path: &Path,
) -> Result<(), DataError> {
    let plot_err = |reason: String| DataError::Plot {
        path: path.to_path_buf(),
        reason,
    };
    if parts.is_empty() || classes == 0 {
        return Err(plot_err(format!(
            "nothing to draw: {} nodes, {classes} classes",
            parts.len()
        )));
    }
    let mut counts = vec![vec![0usize; classes]; parts.len()];
    for (node, part) in parts.iter().enumerate() {
        for &i in part {
            let label = *labels.get(i).ok_or_else(|| {
                plot_err(format!(
                    "node {node} holds sample {i}, but there are {} labels",
                    labels.len()
                ))
            })?;
            *counts[node].get_mut(label as usize).ok_or_else(|| {
                plot_err(format!(
                    "sample {i} has label {label}, not below {classes} classes"
                ))
            })? += 1;
        }
    }
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let size = heatmap_dimensions(parts.len(), classes);
    let bytes = match extension.as_deref() {
        Some("svg") => {
            let mut svg = String::new();
            draw(
                SVGBackend::with_string(&mut svg, size).into_drawing_area(),
                &counts,
                true,
            )
            .map_err(plot_err)?;
            svg.into_bytes()
        }
        Some("png") => {
            let (w, h) = size;
            let mut rgb = vec![0u8; w as usize * h as usize * 3];
            draw(
                BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area(),
                &counts,
                false,
            )
            .map_err(plot_err)?;
            encode_png(&rgb, size).map_err(|e| plot_err(format!("PNG encoding failed: {e}")))?
        }
        _ => {
            return Err(plot_err(
                "unknown picture format; the file name must end in .svg or .png".into(),
            ));
        }
    };
    write_atomic(path, &bytes)
}

/// An 8-bit RGB PNG of `rgb` (rows top to bottom, no padding), encoded by
/// the `png` crate.
pub fn encode_png(rgb: &[u8], (w, h): (u32, u32)) -> Result<Vec<u8>, png::EncodingError> {
    assert_eq!(rgb.len(), w as usize * 3 * h as usize, "buffer is not {w}×{h} RGB");
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

/// Draws the grid (and, with `text`, every label) on `root`. Text must stay
/// off bitmaps: without a font feature plotters panics when rasterising it.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    counts: &[Vec<usize>],
    text: bool,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let (nodes, classes) = (counts.len(), counts[0].len());
    let cell = cell_side(nodes, classes) as i32;
    let (left, top) = (LEFT as i32, TOP as i32);
    let max = counts.iter().flatten().copied().max().unwrap_or(0);
    root.fill(&WHITE).map_err(err)?;
    for (node, row) in counts.iter().enumerate() {
        for (class, &count) in row.iter().enumerate() {
            let x0 = left + class as i32 * cell;
            let y0 = top + node as i32 * cell;
            // Inset by a pixel so neighbouring cells stay apart.
            let shape = Rectangle::new(
                [(x0 + 1, y0 + 1), (x0 + cell - 1, y0 + cell - 1)],
                colour(count, max).filled(),
            );
            root.draw(&shape).map_err(err)?;
            if text && cell >= MIN_TEXT_CELL as i32 {
                let ink = if count * 2 > max { &WHITE } else { &BLACK };
                let size = (f64::from(cell) * 0.4).min(13.0);
                let style = TextStyle::from(("sans-serif", size).into_font())
                    .color(ink)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                let at = (x0 + cell / 2, y0 + cell / 2);
                root.draw(&Text::new(count.to_string(), at, style))
                    .map_err(err)?;
            }
        }
    }
    if !text {
        return root.present().map_err(err);
    }
    // Indices: every one while they fit, else every `step`-th.
    let step = (14 / cell + 1) as usize;
    let tick = |h: HPos, v: VPos| {
        TextStyle::from(("sans-serif", 12).into_font())
            .color(&BLACK)
            .pos(Pos::new(h, v))
    };
    let grid_bottom = top + nodes as i32 * cell;
    for class in (0..classes).step_by(step) {
        let at = (left + class as i32 * cell + cell / 2, grid_bottom + 4);
        root.draw(&Text::new(
            class.to_string(),
            at,
            tick(HPos::Center, VPos::Top),
        ))
        .map_err(err)?;
    }
    for node in (0..nodes).step_by(step) {
        let at = (left - 6, top + node as i32 * cell + cell / 2);
        root.draw(&Text::new(
            node.to_string(),
            at,
            tick(HPos::Right, VPos::Center),
        ))
        .map_err(err)?;
    }
    let title = |transform| {
        TextStyle::from(("sans-serif", 15).into_font().transform(transform))
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center))
    };
    let grid_mid_x = left + classes as i32 * cell / 2;
    root.draw(&Text::new(
        "class",
        (grid_mid_x, grid_bottom + 36),
        title(FontTransform::None),
    ))
    .map_err(err)?;
    let grid_mid_y = top + nodes as i32 * cell / 2;
    root.draw(&Text::new(
        "node",
        (16, grid_mid_y),
        title(FontTransform::Rotate270),
    ))
    .map_err(err)?;
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::Partitioner;

    /// 3 nodes × 4 classes with distinctive counts: node 0 holds 17 of class
    /// 0 and 5 of class 2; node 1 holds 23 of class 1; node 2 holds 41 of
    /// class 3 and 2 of class 0.
    fn fixture() -> (Vec<u8>, Vec<Vec<usize>>) {
        let mut labels = Vec::new();
        let mut parts = vec![Vec::new(); 3];
        for (node, class, n) in [(0, 0u8, 17), (0, 2, 5), (1, 1, 23), (2, 3, 41), (2, 0, 2)] {
            for _ in 0..n {
                parts[node].push(labels.len());
                labels.push(class);
            }
        }
        (labels, parts)
    }

    /// Decodes a PNG with the `png` crate: (width, height, RGB rows).
    fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut rgb).unwrap();
        assert_eq!(
            (frame.color_type, frame.bit_depth),
            (png::ColorType::Rgb, png::BitDepth::Eight)
        );
        rgb.truncate(frame.buffer_size());
        (frame.width, frame.height, rgb)
    }

    #[test]
    fn png_encoder_round_trips() {
        let rgb: Vec<u8> = (0..5 * 3 * 3).map(|i| (i * 37 % 256) as u8).collect();
        let bytes = encode_png(&rgb, (5, 3)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert_eq!(decode_png(&bytes), (5, 3, rgb));
    }

    fn pixel(img: &[u8], width: u32, x: u32, y: u32) -> [u8; 3] {
        let at = (y * width + x) as usize * 3;
        img[at..at + 3].try_into().unwrap()
    }

    #[test]
    fn png_has_signature_size_and_colours() {
        let (labels, parts) = fixture();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.PNG");
        label_heatmap(&labels, 4, &parts, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        let (w, h, img) = decode_png(&bytes);
        assert_eq!((w, h), heatmap_dimensions(3, 4));
        assert_eq!((w, h), (64 + 4 * 40 + 12, 12 + 3 * 40 + 52));
        let centre =
            |node: u32, class: u32| pixel(&img, w, LEFT + class * 40 + 20, TOP + node * 40 + 20);
        assert_eq!(
            centre(2, 3),
            [8, 48, 107],
            "the largest count is the darkest"
        );
        assert_eq!(
            centre(1, 0),
            [247, 251, 255],
            "an empty cell is the lightest"
        );
        let mid = centre(1, 1); // 23 of 41
        assert!(mid[0] < 247 && mid[0] > 8, "{mid:?}");
        assert_eq!(pixel(&img, w, 2, 2), [255, 255, 255], "margin is white");
        // Nothing but the picture is left in the folder.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["labels.PNG"]);
    }

    #[test]
    fn svg_has_a_rect_per_cell_and_the_counts() {
        let (labels, parts) = fixture();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.svg");
        label_heatmap(&labels, 4, &parts, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let (w, h) = heatmap_dimensions(3, 4);
        assert!(
            svg.contains(&format!("width=\"{w}\"")) && svg.contains(&format!("height=\"{h}\""))
        );
        // One per cell, plus the white background.
        assert_eq!(svg.matches("<rect").count(), 3 * 4 + 1);
        let texts: Vec<&str> = svg
            .split("<text")
            .skip(1)
            .map(|t| {
                let body = &t[t.find('>').unwrap() + 1..];
                body[..body.find("</text>").unwrap()].trim()
            })
            .collect();
        // 12 counts, 4 class and 3 node indices, 2 titles.
        assert_eq!(texts.len(), 12 + 4 + 3 + 2, "{texts:?}");
        for needle in ["17", "5", "23", "41", "2", "node", "class"] {
            assert!(texts.contains(&needle), "{needle} missing from {texts:?}");
        }
        assert_eq!(
            texts.iter().filter(|&&t| t == "0").count(),
            7 + 2,
            "7 empty cells, index 0 twice"
        );
    }

    #[test]
    fn big_grid_and_overwrite() {
        let labels: Vec<u8> = (0..3000).map(|i| (i % 10) as u8).collect();
        let parts = Partitioner::Dirichlet { alpha: 0.3 }
            .partition(&labels, 10, 60, 1)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.svg");
        std::fs::write(&path, "old").unwrap();
        label_heatmap(&labels, 10, &parts, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg.matches("<rect").count(), 600 + 1);
        // Cells of 10 px: no counts, every second index.
        assert_eq!(svg.matches("<text").count(), 5 + 30 + 2);
        let png_path = dir.path().join("h.png");
        label_heatmap(&labels, 10, &parts, &png_path).unwrap();
        let (w, h, _) = decode_png(&std::fs::read(&png_path).unwrap());
        assert_eq!((w, h), heatmap_dimensions(60, 10));
        assert_eq!(heatmap_dimensions(60, 10), (64 + 100 + 12, 12 + 600 + 52));
    }

    #[test]
    fn bad_inputs_name_the_file() {
        let (labels, parts) = fixture();
        let dir = tempfile::tempdir().unwrap();
        let jpg = dir.path().join("h.jpg");
        let e = label_heatmap(&labels, 4, &parts, &jpg).unwrap_err();
        assert!(
            matches!(e, DataError::Plot { .. }) && e.to_string().contains("h.jpg"),
            "{e}"
        );
        assert!(!jpg.exists());
        let svg = dir.path().join("h.svg");
        let e = label_heatmap(&labels, 3, &parts, &svg).unwrap_err();
        assert!(e.to_string().contains("label 3"), "{e}");
        let e = label_heatmap(&labels, 4, &[], &svg).unwrap_err();
        assert!(e.to_string().contains("nothing to draw"), "{e}");
        let e = label_heatmap(&labels, 4, &[vec![1000]], &svg).unwrap_err();
        assert!(e.to_string().contains("sample 1000"), "{e}");
        let missing = dir.path().join("no-such-dir").join("h.svg");
        let e = label_heatmap(&labels, 4, &parts, &missing).unwrap_err();
        assert!(matches!(e, DataError::Io { .. }), "{e}");
    }
}
