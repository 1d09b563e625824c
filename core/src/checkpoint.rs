//! Checkpoints and tensor files in safetensors: parameters under their names in docs/design.md, Adam's
//! moments as `adam.m.<name>` / `adam.v.<name>`, the weight average (if kept) as `ema.<name>`,
//! the outer optimizer's momentum of `--sync params` (if kept) as `outer.m.<name>`, and the config, step and data position in the metadata. Writes are atomic (temp file, fsync,
//! rename, fsync of the folder); a [`Checkpointer`] keeps the newest N.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::{CapsNetConfig, CnnConfig};
use crate::error::{CoreError, Result};
use crate::optim::{Adam, AdamConfig};
use crate::params::Params;

const FORMAT: &str = "capsnet-checkpoint-v1";
/// The metadata key of the CRC-32 of every tensor's bytes, in name order.
const CHECKSUM_KEY: &str = "tensors_crc32";

/// A tensor read from or written to a file.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Tensor::F32 { shape, data }
    }
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32 { shape, .. } | Tensor::I64 { shape, .. } => shape,
        }
    }
    /// The tensor's little-endian bytes, without a copy.
    #[cfg(target_endian = "little")]
    fn bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Tensor::F32 { data, .. } => {
                std::borrow::Cow::Borrowed(bytemuck::cast_slice::<f32, u8>(data))
            }
            Tensor::I64 { data, .. } => {
                std::borrow::Cow::Borrowed(bytemuck::cast_slice::<i64, u8>(data))
            }
        }
    }

    #[cfg(not(target_endian = "little"))]
    fn bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(match self {
            Tensor::F32 { data, .. } => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Tensor::I64 { data, .. } => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
    }
}

/// The little-endian bytes of f32s, without a copy where the machine is little-endian.
fn f32_bytes(data: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice::<f32, u8>(data))
    } else {
        std::borrow::Cow::Owned(data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// An f32 tensor to serialize, its data borrowed.
fn f32_raw<'a>(name: String, shape: &[usize], data: &'a [f32]) -> Raw<'a> {
    (name, f32_bytes(data), Dtype::F32, shape.to_vec())
}

/// A tensor's name, bytes, dtype and shape, as serialized.
type Raw<'a> = (String, std::borrow::Cow<'a, [u8]>, Dtype, Vec<usize>);

/// Named tensors plus string metadata, as in a safetensors file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Writes atomically: a temp file in the same folder, fsync, rename, fsync of the folder,
    /// so a crash leaves either the old file or the new one, never half of one.
    pub fn write(&self, path: &Path) -> Result<()> {
        let raws: Vec<Raw<'_>> = self
            .tensors
            .iter()
            .map(|(n, t)| {
                let dt = if matches!(t, Tensor::F32 { .. }) {
                    Dtype::F32
                } else {
                    Dtype::I64
                };
                (n.clone(), t.bytes(), dt, t.shape().to_vec())
            })
            .collect();
        write_raw(path, raws, self.metadata.clone())
    }

    /// Reads every tensor (f32 and i64; other dtypes are an error naming the tensor).
    pub fn read(path: &Path) -> Result<Self> {
        let buf = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
        let st = SafeTensors::deserialize(&buf).map_err(|source| CoreError::SafeTensors {
            path: path.into(),
            source,
        })?;
        let (_, meta) =
            SafeTensors::read_metadata(&buf).map_err(|source| CoreError::SafeTensors {
                path: path.into(),
                source,
            })?;
        if let Some(want) = meta.metadata().as_ref().and_then(|m| m.get(CHECKSUM_KEY)) {
            let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
            names.sort();
            let mut crc = crc32fast::Hasher::new();
            for n in &names {
                let view = st.tensor(n).map_err(|source| CoreError::SafeTensors {
                    path: path.into(),
                    source,
                })?;
                crc.update(view.data());
            }
            let got = format!("{:08x}", crc.finalize());
            if &got != want {
                return Err(CoreError::checkpoint(
                    path,
                    format!(
                        "its tensors do not match their checksum ({got}, written {want}): the file is damaged"
                    ),
                ));
            }
        }
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let t = match view.dtype() {
                Dtype::F32 => Tensor::F32 {
                    shape,
                    data: data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                },
                Dtype::I64 => Tensor::I64 {
                    shape,
                    data: data
                        .chunks_exact(8)
                        .map(|c| {
                            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect(),
                },
                other => {
                    return Err(CoreError::checkpoint(
                        path,
                        format!(
                            "tensor {name} has dtype {other:?}; only F32 and I64 are supported"
                        ),
                    ));
                }
            };
            tensors.insert(name.to_string(), t);
        }
        let mut metadata = meta.metadata().clone().unwrap_or_default();
        metadata.remove(CHECKSUM_KEY);
        Ok(TensorFile { tensors, metadata })
    }
}

/// Writes named tensors (their bytes borrowed, not copied) and `metadata` as a safetensors
/// file at `path`, atomically (see [`write_atomic`]), streamed to the file without building
/// it in memory. The metadata gets a CRC-32 of every tensor's bytes, in name order: a file
/// damaged after it was written (a bad disk, a truncated copy) is told from a good one on
/// reading.
fn write_raw(
    path: &Path,
    mut raws: Vec<Raw<'_>>,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    raws.sort_by(|a, b| a.0.cmp(&b.0));
    let mut crc = crc32fast::Hasher::new();
    for (_, b, _, _) in &raws {
        crc.update(b);
    }
    metadata.insert(CHECKSUM_KEY.into(), format!("{:08x}", crc.finalize()));
    let st_err = |source| CoreError::SafeTensors {
        path: path.into(),
        source,
    };
    let views = raws
        .iter()
        .map(|(n, b, dt, shape)| Ok((n.as_str(), TensorView::new(*dt, shape.clone(), b)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(st_err)?;
    let (dir, tmp) = temp_path(path);
    let written = safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(st_err)
        .and_then(|()| commit(&tmp, path, dir).map_err(|e| CoreError::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The folder of `path` and the temporary file a write of `path` goes through first.
fn temp_path(path: &Path) -> (&Path, PathBuf) {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, dir.join(format!(".{name}.tmp-{}", std::process::id())))
}

/// Makes a written temporary file durable and puts it in place: fsync, rename, fsync of the
/// folder (so the rename itself survives a crash).
fn commit(tmp: &Path, path: &Path, dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (dir, tmp) = temp_path(path);
    let result = (|| {
        std::fs::File::create(&tmp)?.write_all(bytes)?;
        commit(&tmp, path, dir)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(CoreError::io(path, e));
    }
    Ok(())
}

/// Where a run is in the data: the epoch, how many positions of its permutation were handed
/// out (`offset`), and the ranges below `offset` that were handed out but not trained (a
/// distributed member's work, lost with it), which are trained before the rest. The trainer
/// never has any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataPosition {
    pub epoch: u64,
    pub offset: u64,
    /// `[start, end)` ranges, sorted and disjoint.
    pub redo: Vec<(u64, u64)>,
}

/// Everything needed to resume training, or just the parameters (for eval/grad).
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub config: CapsNetConfig,
    /// The CNN baseline's config when the file holds that network (metadata `baseline`).
    pub baseline: Option<CnnConfig>,
    pub params: Params,
    pub adam: Option<Adam>,
    /// The moving average of the weights (`--ema-decay`), stored as `ema.<name>`.
    pub ema: Option<Vec<f32>>,
    /// The outer optimizer's momentum (`--outer-optimizer nesterov`), stored as `outer.m.<name>`.
    pub outer: Option<Vec<f32>>,
    /// Optimizer steps (rounds) taken.
    pub step: u64,
    pub position: DataPosition,
}

impl Checkpoint {
    pub fn to_file(&self) -> Result<TensorFile> {
        let mut f = TensorFile::default();
        for (spec, data) in self.params.iter() {
            f.tensors.insert(
                spec.name.clone(),
                Tensor::f32(spec.shape.clone(), data.to_vec()),
            );
            if let Some(adam) = &self.adam {
                f.tensors.insert(
                    format!("adam.m.{}", spec.name),
                    Tensor::f32(spec.shape.clone(), adam.m[spec.range()].to_vec()),
                );
                f.tensors.insert(
                    format!("adam.v.{}", spec.name),
                    Tensor::f32(spec.shape.clone(), adam.v[spec.range()].to_vec()),
                );
            }
            if let Some(ema) = &self.ema {
                f.tensors.insert(
                    format!("ema.{}", spec.name),
                    Tensor::f32(spec.shape.clone(), ema[spec.range()].to_vec()),
                );
            }
            if let Some(outer) = &self.outer {
                f.tensors.insert(
                    format!("outer.m.{}", spec.name),
                    Tensor::f32(spec.shape.clone(), outer[spec.range()].to_vec()),
                );
            }
        }
        f.metadata = self.metadata()?;
        Ok(f)
    }

    /// The checkpoint's metadata: format, network config, step, data position, Adam settings.
    fn metadata(&self) -> Result<HashMap<String, String>> {
        let json = |v: &dyn erased::Json| v.to_json();
        let mut meta = HashMap::new();
        let m = &mut meta;
        m.insert("format".into(), FORMAT.into());
        m.insert("config".into(), json(&self.config)?);
        if let Some(b) = &self.baseline {
            m.insert("baseline".into(), json(b)?);
        }
        m.insert("step".into(), self.step.to_string());
        m.insert("epoch".into(), self.position.epoch.to_string());
        m.insert("epoch_offset".into(), self.position.offset.to_string());
        if !self.position.redo.is_empty() {
            let redo: Vec<String> = (self.position.redo.iter())
                .map(|(a, b)| format!("{a}-{b}"))
                .collect();
            m.insert("epoch_redo".into(), redo.join(","));
        }
        if let Some(adam) = &self.adam {
            m.insert("adam.config".into(), json(&adam.config)?);
            m.insert("adam.step".into(), adam.step.to_string());
        }
        Ok(meta)
    }

    /// Writes the checkpoint atomically, straight from its state: no copy of the tensors is
    /// made on the way to the file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut raws = vec![];
        for (spec, data) in self.params.iter() {
            let r = spec.range();
            raws.push(f32_raw(spec.name.clone(), &spec.shape, data));
            if let Some(adam) = &self.adam {
                raws.push(f32_raw(
                    format!("adam.m.{}", spec.name),
                    &spec.shape,
                    &adam.m[r.clone()],
                ));
                raws.push(f32_raw(
                    format!("adam.v.{}", spec.name),
                    &spec.shape,
                    &adam.v[r.clone()],
                ));
            }
            if let Some(ema) = &self.ema {
                raws.push(f32_raw(
                    format!("ema.{}", spec.name),
                    &spec.shape,
                    &ema[r.clone()],
                ));
            }
            if let Some(outer) = &self.outer {
                raws.push(f32_raw(
                    format!("outer.m.{}", spec.name),
                    &spec.shape,
                    &outer[r],
                ));
            }
        }
        write_raw(path, raws, self.metadata()?)
    }

    /// Loads a checkpoint. The network config comes from the file's metadata, or `fallback`
    /// (default: the paper's) for files without it, such as the PyTorch oracle's weights. Every
    /// parameter must be present with its exact shape; unknown tensors are an error. Adam state
    /// is optional (a parameters-only file loads with `adam = None`).
    pub fn load(path: &Path, fallback: Option<&CapsNetConfig>) -> Result<Self> {
        let file = TensorFile::read(path)?;
        let meta = &file.metadata;
        let config: CapsNetConfig = match meta.get("config") {
            Some(s) => serde_json::from_str(s).map_err(|source| CoreError::Json {
                what: format!("{}: config", path.display()),
                source,
            })?,
            None => fallback.cloned().unwrap_or_default(),
        };
        config
            .validate()
            .map_err(|e| CoreError::checkpoint(path, e.to_string()))?;
        let baseline: Option<CnnConfig> = match meta.get("baseline") {
            Some(s) => Some(serde_json::from_str(s).map_err(|source| CoreError::Json {
                what: format!("{}: baseline", path.display()),
                source,
            })?),
            None => None,
        };
        if let Some(b) = &baseline {
            b.validate()
                .map_err(|e| CoreError::checkpoint(path, format!("baseline: {e}")))?;
        }
        let layout = crate::net::layout_for(&config, baseline.as_ref());
        let take = |name: &str| -> Result<Option<&Vec<f32>>> {
            match file.tensors.get(name) {
                None => Ok(None),
                Some(Tensor::F32 { shape, data }) => {
                    let want = layout.get(base_name(name)).map(|s| &s.shape);
                    if want != Some(shape) {
                        return Err(CoreError::checkpoint(
                            path,
                            format!(
                                "tensor {name} has shape {shape:?}, the model needs {:?}",
                                want.cloned().unwrap_or_default()
                            ),
                        ));
                    }
                    // A state that is not finite cannot be trained from.
                    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                        return Err(CoreError::checkpoint(
                            path,
                            format!(
                                "tensor {name} holds a non-finite value ({}) at {i}",
                                data[i]
                            ),
                        ));
                    }
                    Ok(Some(data))
                }
                Some(Tensor::I64 { .. }) => Err(CoreError::checkpoint(
                    path,
                    format!("tensor {name} is I64, expected F32"),
                )),
            }
        };
        let mut params = Params::zeros(&layout);
        let mut missing = vec![];
        for spec in layout.specs() {
            match take(&spec.name)? {
                Some(d) => params.data[spec.range()].copy_from_slice(d),
                None => missing.push(spec.name.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(CoreError::checkpoint(
                path,
                format!("missing parameters: {}", missing.join(", ")),
            ));
        }
        let known = |n: &str| layout.get(base_name(n)).is_some();
        let unknown: Vec<&str> = file
            .tensors
            .keys()
            .map(String::as_str)
            .filter(|n| !known(n))
            .collect();
        if !unknown.is_empty() {
            return Err(CoreError::checkpoint(
                path,
                format!(
                    "tensors the model does not have: {} (wrong --routing/config or not a capsnet file?)",
                    unknown.join(", ")
                ),
            ));
        }
        let num = |key: &str| -> Result<u64> {
            meta.get(key).map_or(Ok(0), |s| {
                s.parse().map_err(|_| {
                    CoreError::checkpoint(path, format!("metadata {key} = {s:?} is not a number"))
                })
            })
        };
        let adam = if file.tensors.keys().any(|n| n.starts_with("adam.")) {
            let mut m = vec![0.0; layout.total()];
            let mut v = vec![0.0; layout.total()];
            for spec in layout.specs() {
                for (prefix, dst) in [("adam.m.", &mut m), ("adam.v.", &mut v)] {
                    let name = format!("{prefix}{}", spec.name);
                    let d = take(&name)?.ok_or_else(|| {
                        CoreError::checkpoint(path, format!("missing optimizer state {name}"))
                    })?;
                    dst[spec.range()].copy_from_slice(d);
                }
            }
            let config: AdamConfig = match meta.get("adam.config") {
                Some(s) => serde_json::from_str(s).map_err(|source| CoreError::Json {
                    what: format!("{}: adam.config", path.display()),
                    source,
                })?,
                None => AdamConfig::default(),
            };
            Some(Adam {
                config,
                m,
                v,
                step: num("adam.step")?,
            })
        } else {
            None
        };
        // A whole-vector state stored per parameter under `prefix`, if any of it is there.
        let whole = |prefix: &str, what: &str| -> Result<Option<Vec<f32>>> {
            if !file.tensors.keys().any(|n| n.starts_with(prefix)) {
                return Ok(None);
            }
            let mut all = vec![0.0; layout.total()];
            for spec in layout.specs() {
                let name = format!("{prefix}{}", spec.name);
                let d = take(&name)?
                    .ok_or_else(|| CoreError::checkpoint(path, format!("missing {what} {name}")))?;
                all[spec.range()].copy_from_slice(d);
            }
            Ok(Some(all))
        };
        let ema = whole("ema.", "weight average")?;
        let outer = whole("outer.m.", "outer momentum")?;
        Ok(Checkpoint {
            config,
            baseline,
            params,
            adam,
            ema,
            outer,
            step: num("step")?,
            position: DataPosition {
                epoch: num("epoch")?,
                offset: num("epoch_offset")?,
                redo: match meta.get("epoch_redo") {
                    None => vec![],
                    Some(s) => parse_redo(s).ok_or_else(|| {
                        CoreError::checkpoint(
                            path,
                            format!("epoch_redo {s:?} is not a list of start-end ranges"),
                        )
                    })?,
                },
            },
        })
    }
}

/// `"a-b,c-d"` as sorted, disjoint, non-empty ranges.
fn parse_redo(s: &str) -> Option<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = vec![];
    for part in s.split(',') {
        let (a, b) = part.split_once('-')?;
        let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        if a >= b || out.last().is_some_and(|&(_, e)| e > a) {
            return None;
        }
        out.push((a, b));
    }
    Some(out)
}

/// The parameter a stored tensor belongs to: `adam.m.<name>`, `adam.v.<name>`, `ema.<name>`
/// and `outer.m.<name>` all have the shape of `<name>`.
fn base_name(n: &str) -> &str {
    ["adam.m.", "adam.v.", "ema.", "outer.m."]
        .iter()
        .find_map(|p| n.strip_prefix(p))
        .unwrap_or(n)
}

mod erased {
    use crate::error::{CoreError, Result};
    pub trait Json {
        fn to_json(&self) -> Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<String> {
            serde_json::to_string(self).map_err(|source| CoreError::Json {
                what: "metadata".into(),
                source,
            })
        }
    }
}

/// Saves `checkpoint-<step>.safetensors` into a run directory and keeps the newest `keep`.
#[derive(Clone, Debug)]
pub struct Checkpointer {
    dir: PathBuf,
    keep: usize,
}

impl Checkpointer {
    pub fn new(dir: &Path, keep: usize) -> Self {
        Checkpointer {
            dir: dir.to_path_buf(),
            keep: keep.max(1),
        }
    }

    pub fn path_for(&self, step: u64) -> PathBuf {
        self.dir.join(format!("checkpoint-{step}.safetensors"))
    }

    /// Writes the checkpoint, then removes all but the newest `keep`.
    pub fn save(&self, ckpt: &Checkpoint) -> Result<PathBuf> {
        let path = self.path_for(ckpt.step);
        ckpt.save(&path)?;
        // The new checkpoint is written: an old one that cannot be removed costs disk space,
        // not the save.
        match list_checkpoints(&self.dir) {
            Ok(all) => {
                for (_, old) in all.iter().rev().skip(self.keep) {
                    if let Err(e) = std::fs::remove_file(old) {
                        tracing::warn!(path = %old.display(), error = %e, "cannot remove an old checkpoint");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list old checkpoints to remove"),
        }
        Ok(path)
    }
}

/// `(step, path)` of every `checkpoint-<step>.safetensors` file in `dir`, oldest first
/// (anything else of that name, such as a folder, is not a checkpoint).
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).map_err(|e| CoreError::io(dir, e))? {
        let entry = entry.map_err(|e| CoreError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.strip_suffix(".safetensors"))
        {
            if let Ok(step) = step.parse::<u64>()
                && entry.path().is_file()
            {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint of a run directory.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(dir)?.pop().map(|(_, p)| p))
}
