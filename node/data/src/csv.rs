//! Reader for users' own tabular data: numeric CSV files.
//!
//! What is accepted (and why so little):
//! * Comma-separated, UTF-8, one sample per line; blank lines are skipped;
//!   a field may be wrapped in double quotes, but quoted commas and escaped
//!   quotes are not supported — numeric tables have no use for them, and a
//!   full CSV dialect parser would be a dependency for nothing.
//! * The first non-blank line is a header if any of its fields is not a
//!   number. A label column given by name needs a header; one given by
//!   0-based index works with or without. If both files have a header, the
//!   headers must be identical, so that columns cannot be silently reordered
//!   between train and test.
//! * Labels are integers 0..=255 (`3.0` is accepted as 3). `classes` is
//!   max label + 1 over both files unless declared.
//! * Features are stored as bytes ([`super::Dataset`] holds `u8`), so they
//!   must be either integers 0..=255 (stored as they are) or reals in
//!   [0, 1] (quantised to `round(x · 255)`: resolution 1/255, anything finer
//!   is lost). Which one is `values` in the config; `auto` picks reals if any
//!   feature in either file is written with a decimal point or an exponent,
//!   and bytes otherwise — decided over both files at once so train and test
//!   are never scaled differently. Anything else (negative, 300, 1.5, NaN,
//!   text) is rejected naming file, line and column: rescaling users' data
//!   silently would make results meaningless. Standardise into [0, 1] first.
//! * Samples have `shape = [1, 1, features]`.
//!
//! Files are read whole into memory and scanned twice (mode, then values)
//! rather than tokenised into a table, so memory stays near one copy of the
//! text plus the bytes.

use std::path::Path;

use super::{
    CsvValues, DataError, DataSplits, Dataset, LabelColumn, class_count, quantise_unit, read_file,
};

/// Loads a train and a test CSV file; see the module documentation.
pub fn load(
    train: &Path,
    test: &Path,
    label_column: &LabelColumn,
    values: CsvValues,
    classes: Option<usize>,
) -> Result<DataSplits, DataError> {
    let train_table = Table::open(train, label_column)?;
    let test_table = Table::open(test, label_column)?;
    let (tf, ef) = (train_table.fields - 1, test_table.fields - 1);
    if tf != ef {
        return Err(DataError::TrainTest {
            train: train.to_path_buf(),
            test: test.to_path_buf(),
            reason: format!("train has {tf} feature columns, test has {ef}"),
        });
    }
    if let (Some(th), Some(eh)) = (&train_table.header, &test_table.header)
        && let Some(j) = (0..th.len()).find(|&j| th[j] != eh[j])
    {
        return Err(DataError::TrainTest {
            train: train.to_path_buf(),
            test: test.to_path_buf(),
            reason: format!(
                "headers differ at column {j}: {:?} in train, {:?} in test",
                th[j], eh[j]
            ),
        });
    }
    let mode = match values {
        CsvValues::Bytes => Mode::Bytes("values = \"bytes\""),
        CsvValues::Unit => Mode::Unit("values = \"unit\"".into()),
        CsvValues::Auto => match train_table.first_real().or_else(|| test_table.first_real()) {
            Some((path, line, column)) => Mode::Unit(format!(
                "values = \"auto\" reads reals in [0, 1] because {} line {line}, column {column} is written as a real",
                path.display()
            )),
            None => Mode::Bytes(
                "values = \"auto\" reads integers 0..=255 because no feature in either file has a decimal point or exponent",
            ),
        },
    };
    let train_rows = train_table.parse(&mode)?;
    let test_rows = test_table.parse(&mode)?;
    let classes = class_count(
        classes,
        &train_rows.labels,
        &test_rows.labels,
        |split, i, label, classes| {
            let (table, rows) = if split == 0 {
                (&train_table, &train_rows)
            } else {
                (&test_table, &test_rows)
            };
            DataError::Csv {
                path: table.path.to_path_buf(),
                line: rows.lines[i],
                column: table.column(table.label),
                reason: format!("label {label} is not below classes = {classes}"),
            }
        },
    )?;
    let dataset = |rows: Rows| Dataset {
        pixels: rows.pixels,
        labels: rows.labels,
        features: tf,
        shape: [1, 1, tf],
        classes,
    };
    Ok(DataSplits {
        train: dataset(train_rows),
        test: dataset(test_rows),
        source: format!("csv ({}, {})", train.display(), test.display()),
    })
}

/// How feature values are read, with the reason quoted in errors.
enum Mode {
    Bytes(&'static str),
    Unit(String),
}

/// One file's text and layout.
struct Table<'a> {
    path: &'a Path,
    text: String,
    header: Option<Vec<String>>,
    /// Line number of the header, if any (data starts after it).
    header_line: Option<usize>,
    /// Fields per line, label included.
    fields: usize,
    /// Index of the label column.
    label: usize,
}

/// The parsed samples of one file; `lines[i]` is sample `i`'s line number.
struct Rows {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    lines: Vec<usize>,
}

/// Non-blank lines with their 1-based line numbers.
fn numbered_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty())
}

/// A line's fields, trimmed and unquoted.
fn fields(line: &str) -> impl Iterator<Item = &str> {
    line.split(',').map(|f| {
        let f = f.trim();
        f.strip_prefix('"')
            .and_then(|f| f.strip_suffix('"'))
            .unwrap_or(f)
            .trim()
    })
}

impl<'a> Table<'a> {
    fn open(path: &'a Path, label_column: &LabelColumn) -> Result<Table<'a>, DataError> {
        let format_err = |reason: String| DataError::Format {
            path: path.to_path_buf(),
            format: "CSV",
            reason,
        };
        let bytes = read_file(path)?;
        let mut text = String::from_utf8(bytes).map_err(|e| {
            format_err(format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ))
        })?;
        if text.starts_with('\u{feff}') {
            text.drain(..'\u{feff}'.len_utf8());
        }
        let (first_line, first) = numbered_lines(&text)
            .next()
            .ok_or_else(|| format_err("the file has no rows".into()))?;
        let cells: Vec<&str> = fields(first).collect();
        let is_header = cells.iter().any(|c| c.parse::<f64>().is_err());
        let header: Option<Vec<String>> =
            is_header.then(|| cells.iter().map(|c| c.to_string()).collect());
        let n = cells.len();
        let label = match label_column {
            LabelColumn::Index(i) if *i < n => *i,
            LabelColumn::Index(i) => {
                return Err(format_err(format!(
                    "label_column = {i} but line {first_line} has only {n} columns (indices 0..{n})"
                )));
            }
            LabelColumn::Name(name) => match &header {
                None => {
                    return Err(format_err(format!(
                        "label_column = {name:?} names a column, but line {first_line} is all numbers, not a header; \
                         give label_column as a 0-based index instead"
                    )));
                }
                Some(h) => h.iter().position(|c| c == name).ok_or_else(|| {
                    format_err(format!(
                        "no column named {name:?} in the header on line {first_line} (columns: {})",
                        h.join(", ")
                    ))
                })?,
            },
        };
        if n < 2 {
            return Err(format_err(format!(
                "line {first_line} has {n} column(s); need a label and at least one feature"
            )));
        }
        Ok(Table {
            path,
            header,
            header_line: is_header.then_some(first_line),
            fields: n,
            label,
            text,
        })
    }

    /// Column `j` for messages: its 0-based index and header name.
    fn column(&self, j: usize) -> String {
        match &self.header {
            Some(h) => format!("{j} ({:?})", h[j]),
            None => j.to_string(),
        }
    }

    fn data_lines(&self) -> impl Iterator<Item = (usize, &str)> {
        let skip = self.header_line;
        numbered_lines(&self.text).filter(move |&(n, _)| Some(n) != skip)
    }

    /// The first feature field written as a real (decimal point or exponent).
    fn first_real(&self) -> Option<(&Path, usize, String)> {
        self.data_lines().find_map(|(line, text)| {
            fields(text)
                .enumerate()
                .find(|&(j, f)| j != self.label && f.contains(['.', 'e', 'E']))
                .map(|(j, _)| (self.path, line, self.column(j)))
        })
    }

    fn parse(&self, mode: &Mode) -> Result<Rows, DataError> {
        let features = self.fields - 1;
        let mut rows = Rows {
            pixels: Vec::new(),
            labels: Vec::new(),
            lines: Vec::new(),
        };
        for (line, text) in self.data_lines() {
            let err = |j: usize, reason: String| DataError::Csv {
                path: self.path.to_path_buf(),
                line,
                column: self.column(j),
                reason,
            };
            let start = rows.pixels.len();
            let mut count = 0;
            for (j, cell) in fields(text).enumerate() {
                count += 1;
                if j >= self.fields {
                    continue;
                }
                if j == self.label {
                    rows.labels.push(parse_label(cell).ok_or_else(|| {
                        err(j, format!("label {cell:?} is not an integer in 0..=255"))
                    })?);
                    continue;
                }
                let byte = match mode {
                    Mode::Bytes(why) => cell.parse::<u8>().map_err(|_| {
                        err(
                            j,
                            format!("value {cell:?} is not an integer in 0..=255 ({why})"),
                        )
                    })?,
                    Mode::Unit(why) => {
                        let x = cell.parse::<f64>().map_err(|_| {
                            err(j, format!("value {cell:?} is not a number ({why})"))
                        })?;
                        quantise_unit(x).ok_or_else(|| {
                            err(j, format!("value {cell:?} is outside [0, 1] ({why})"))
                        })?
                    }
                };
                rows.pixels.push(byte);
            }
            if count != self.fields {
                return Err(DataError::Format {
                    path: self.path.to_path_buf(),
                    format: "CSV",
                    reason: format!(
                        "line {line} has {count} columns, the first line has {}",
                        self.fields
                    ),
                });
            }
            debug_assert_eq!(rows.pixels.len() - start, features);
            rows.lines.push(line);
        }
        if rows.labels.is_empty() {
            return Err(DataError::Format {
                path: self.path.to_path_buf(),
                format: "CSV",
                reason: "the file has a header but no data rows".into(),
            });
        }
        Ok(rows)
    }
}

/// An integer label 0..=255, also when written as a real with no fraction
/// (`3.0`, as pandas writes integer columns that once held a NaN).
fn parse_label(cell: &str) -> Option<u8> {
    cell.parse::<u8>().ok().or_else(|| {
        let x = cell.parse::<f64>().ok()?;
        (x.fract() == 0.0 && (0.0..=255.0).contains(&x)).then_some(x as u8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataSource;
    use std::path::PathBuf;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn source(train: &Path, test: &Path, label_column: LabelColumn) -> DataSource {
        DataSource::Csv {
            train: train.into(),
            test: test.into(),
            label_column,
            values: CsvValues::Auto,
            classes: None,
        }
    }

    #[test]
    fn bytes_with_header_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let tr = write(
            dir.path(),
            "tr.csv",
            "a,label,b\n0,1,255\n\n17,\"0\",3\r\n9,4,9\n",
        );
        let te = write(dir.path(), "te.csv", "a,label,b\n1,2,3\n");
        let s = source(&tr, &te, LabelColumn::default()).load().unwrap();
        assert_eq!(s.train.pixels, [0, 255, 17, 3, 9, 9]);
        assert_eq!(s.train.labels, [1, 0, 4]);
        assert_eq!(s.test.pixels, [1, 3]);
        assert_eq!(s.test.labels, [2]);
        assert_eq!((s.train.features, s.train.shape), (2, [1, 1, 2]));
        assert_eq!(s.train.classes, 5, "max label 4 + 1");
        assert_eq!(s.test.classes, 5);
    }

    #[test]
    fn reals_quantised_by_index_without_header() {
        let dir = tempfile::tempdir().unwrap();
        // Label in column 0; one real value switches both files to [0, 1] mode.
        let tr = write(dir.path(), "tr.csv", "2,0.5,1\n0,0,1e-1\n");
        let te = write(dir.path(), "te.csv", "1.0,1,0\n");
        let s = source(&tr, &te, LabelColumn::Index(0)).load().unwrap();
        assert_eq!(s.train.pixels, [128, 255, 0, 26]);
        assert_eq!(s.test.pixels, [255, 0], "test read as reals too");
        assert_eq!(s.train.labels, [2, 0]);
        assert_eq!(s.test.labels, [1]);
        assert_eq!(s.train.classes, 3);

        // Forced bytes: the same "1" is 1/255, and 0.5 is an error.
        let te2 = write(dir.path(), "te2.csv", "1,1,0\n");
        let e = DataSource::Csv {
            train: te2.clone(),
            test: te2.clone(),
            label_column: LabelColumn::Index(0),
            values: CsvValues::Unit,
            classes: Some(4),
        }
        .load()
        .unwrap();
        assert_eq!((e.train.pixels.clone(), e.train.classes), (vec![255, 0], 4));
        let b = DataSource::Csv {
            train: te2.clone(),
            test: te2,
            label_column: LabelColumn::Index(0),
            values: CsvValues::Bytes,
            classes: None,
        }
        .load()
        .unwrap();
        assert_eq!(b.train.pixels, [1, 0]);
    }

    fn load_err(train: &str, test: &str, label_column: LabelColumn) -> (DataError, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let tr = write(dir.path(), "train.csv", train);
        let te = write(dir.path(), "test.csv", test);
        let e = source(&tr, &te, label_column).load().unwrap_err();
        // The tempdir goes away; the path is still what the message names.
        (e, tr)
    }

    #[test]
    fn out_of_range_values_name_file_line_column() {
        let (e, tr) = load_err(
            "x,y,label\n1,2,0\n3,300,1\n",
            "x,y,label\n1,2,0\n",
            LabelColumn::default(),
        );
        let msg = e.to_string();
        assert!(
            matches!(&e, DataError::Csv { line: 3, column, .. } if column == "1 (\"y\")"),
            "{msg}"
        );
        assert!(
            msg.contains(&tr.display().to_string()) && msg.contains("\"300\""),
            "{msg}"
        );
        assert!(msg.contains("0..=255"), "{msg}");

        let (e, _) = load_err(
            "label,x\n0,0.5\n",
            "label,x\n1,1.5\n",
            LabelColumn::default(),
        );
        let msg = e.to_string();
        assert!(matches!(&e, DataError::Csv { line: 2, .. }), "{msg}");
        assert!(
            msg.contains("test.csv") && msg.contains("outside [0, 1]"),
            "{msg}"
        );
        assert!(
            msg.contains("train.csv line 2, column 1 (\"x\")"),
            "reason for real mode: {msg}"
        );

        for bad in ["-0.2", "nan", "abc"] {
            let (e, _) = load_err(
                &format!("label,x\n0,0.5\n1,{bad}\n"),
                "label,x\n1,0\n",
                LabelColumn::default(),
            );
            assert!(matches!(&e, DataError::Csv { line: 3, .. }), "{bad}: {e}");
        }
        let (e, _) = load_err("label,x\n0,-1\n", "label,x\n1,0\n", LabelColumn::default());
        assert!(matches!(&e, DataError::Csv { line: 2, .. }), "{e}");
        let (e, _) = load_err("label,x\n0.5,1\n", "label,x\n1,0\n", LabelColumn::default());
        assert!(e.to_string().contains("label \"0.5\""), "{e}");
    }

    #[test]
    fn declared_classes_are_checked_with_line() {
        let dir = tempfile::tempdir().unwrap();
        let tr = write(dir.path(), "tr.csv", "label,x\n0,1\n1,2\n");
        let te = write(dir.path(), "te.csv", "label,x\n1,1\n\n5,2\n");
        let e = DataSource::Csv {
            train: tr,
            test: te,
            label_column: LabelColumn::default(),
            values: CsvValues::Auto,
            classes: Some(3),
        }
        .load()
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(&e, DataError::Csv { line: 4, .. }), "{msg}");
        assert!(
            msg.contains("te.csv") && msg.contains("label 5") && msg.contains("classes = 3"),
            "{msg}"
        );
    }

    #[test]
    fn layout_errors() {
        let (e, _) = load_err(
            "label,x\n0,1\n1,2,3\n",
            "label,x\n0,1\n",
            LabelColumn::default(),
        );
        assert!(e.to_string().contains("line 3 has 3 columns"), "{e}");
        let (e, _) = load_err("0,1\n", "0,1\n", LabelColumn::default());
        assert!(e.to_string().contains("not a header"), "{e}");
        let (e, _) = load_err("y,x\n0,1\n", "y,x\n0,1\n", LabelColumn::default());
        assert!(
            e.to_string().contains("no column named \"label\"") && e.to_string().contains("y, x"),
            "{e}"
        );
        let (e, _) = load_err("0,1\n", "0,1\n", LabelColumn::Index(2));
        assert!(e.to_string().contains("label_column = 2"), "{e}");
        let (e, _) = load_err(
            "label,x,z\n0,1,2\n",
            "label,x\n0,1\n",
            LabelColumn::default(),
        );
        assert!(
            matches!(e, DataError::TrainTest { .. }) && e.to_string().contains("2 feature columns"),
            "{e}"
        );
        let (e, _) = load_err(
            "label,x,z\n0,1,2\n",
            "label,z,x\n0,1,2\n",
            LabelColumn::default(),
        );
        assert!(
            e.to_string()
                .contains("column 1: \"x\" in train, \"z\" in test"),
            "{e}"
        );
        let (e, _) = load_err("label,x\n", "label,x\n0,1\n", LabelColumn::default());
        assert!(e.to_string().contains("no data rows"), "{e}");
        let (e, _) = load_err("\n\n", "label,x\n0,1\n", LabelColumn::default());
        assert!(e.to_string().contains("no rows"), "{e}");
        let (e, _) = load_err("label\n1\n", "label\n1\n", LabelColumn::default());
        assert!(e.to_string().contains("at least one feature"), "{e}");
    }

    #[test]
    fn toml_forms() {
        #[derive(serde::Deserialize)]
        struct Cfg {
            data: DataSource,
        }
        let c: Cfg =
            toml::from_str("[data]\nkind = \"csv\"\ntrain = \"a.csv\"\ntest = \"b.csv\"\n")
                .unwrap();
        assert_eq!(
            c.data,
            DataSource::Csv {
                train: "a.csv".into(),
                test: "b.csv".into(),
                label_column: LabelColumn::Name("label".into()),
                values: CsvValues::Auto,
                classes: None
            }
        );
        let c: Cfg = toml::from_str(
            "[data]\nkind = \"csv\"\ntrain = \"a\"\ntest = \"b\"\nlabel_column = 4\nvalues = \"unit\"\nclasses = 3\n",
        )
        .unwrap();
        assert_eq!(
            c.data,
            DataSource::Csv {
                train: "a".into(),
                test: "b".into(),
                label_column: LabelColumn::Index(4),
                values: CsvValues::Unit,
                classes: Some(3)
            }
        );
        let c: Cfg = toml::from_str(
            "[data]\nkind = \"csv\"\ntrain = \"a\"\ntest = \"b\"\nlabel_column = \"y\"\n",
        )
        .unwrap();
        assert!(
            matches!(c.data, DataSource::Csv { label_column: LabelColumn::Name(n), .. } if n == "y")
        );
        assert!(toml::from_str::<Cfg>("[data]\nkind = \"csv\"\ntrain = \"a\"\n").is_err());
        assert!(
            toml::from_str::<Cfg>(
                "[data]\nkind = \"csv\"\ntrain = \"a\"\ntest = \"b\"\nvalues = \"floats\"\n"
            )
            .is_err()
        );
    }
}
