//! MTCNN face detection (Zhang et al. 2016): the P-, R- and O-Net cascade with the weights
//! facenet-pytorch ships, converted to safetensors by ops/setup-torch.
//!
//! The cascade follows facenet-pytorch's `detect_face` step for step (image pyramid, area
//! resampling, the same thresholds, NMS rounds and box calibration), so our boxes can be
//! checked against its Python output (`tests/torch_mtcnn.rs`). One deliberate difference: a
//! candidate whose crop is empty is dropped together with its box, where the Python code
//! would misalign the remaining boxes with their scores.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::image::Image;
use crate::nms::{nms, Detection, IouMode};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtcnnConfig {
    /// Smallest face searched for, in pixels.
    pub min_face_size: f64,
    /// Score thresholds of the three stages.
    pub thresholds: [f32; 3],
    /// Scale step of the image pyramid.
    pub factor: f64,
}

impl Default for MtcnnConfig {
    fn default() -> Self {
        MtcnnConfig { min_face_size: 20.0, thresholds: [0.6, 0.7, 0.7], factor: 0.709 }
    }
}

/// One face: corners in pixels, the O-Net's score and five landmarks (eyes, nose, mouth corners).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Face {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub score: f32,
    pub landmarks: [(f32, f32); 5],
}

#[derive(Debug)]
struct Prelu(Tensor);

impl Module for Prelu {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.prelu(&self.0)
    }
}

fn prelu(p: nn::Path, n: i64) -> Prelu {
    Prelu(p.var("weight", &[n], nn::Init::Const(0.25)))
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64) -> nn::Conv2D {
    nn::conv2d(p, cin, cout, k, Default::default())
}

fn pool(k: i64, s: i64) -> impl Fn(&Tensor) -> Tensor {
    move |x| x.max_pool2d([k, k], [s, s], [0, 0], [1, 1], true)
}

struct Net {
    vs: nn::VarStore,
    body: nn::Sequential,
    heads: Vec<nn::Linear>,
}

/// Channels-last flattening, as the original Caffe models were trained with.
fn flatten_hwc(x: &Tensor) -> Tensor {
    x.permute([0, 3, 2, 1]).contiguous().flatten(1, -1)
}

fn pnet(vs: &nn::VarStore) -> (nn::Sequential, nn::Conv2D, nn::Conv2D) {
    let p = vs.root();
    let body = nn::seq()
        .add(conv(&p / "conv1", 3, 10, 3))
        .add(prelu(&p / "prelu1", 10))
        .add_fn(pool(2, 2))
        .add(conv(&p / "conv2", 10, 16, 3))
        .add(prelu(&p / "prelu2", 16))
        .add(conv(&p / "conv3", 16, 32, 3))
        .add(prelu(&p / "prelu3", 32));
    (body, conv(&p / "conv4_1", 32, 2, 1), conv(&p / "conv4_2", 32, 4, 1))
}

fn rnet(vs: &nn::VarStore) -> (nn::Sequential, Vec<nn::Linear>) {
    let p = vs.root();
    let body = nn::seq()
        .add(conv(&p / "conv1", 3, 28, 3))
        .add(prelu(&p / "prelu1", 28))
        .add_fn(pool(3, 2))
        .add(conv(&p / "conv2", 28, 48, 3))
        .add(prelu(&p / "prelu2", 48))
        .add_fn(pool(3, 2))
        .add(conv(&p / "conv3", 48, 64, 2))
        .add(prelu(&p / "prelu3", 64))
        .add_fn(flatten_hwc)
        .add(nn::linear(&p / "dense4", 576, 128, Default::default()))
        .add(prelu(&p / "prelu4", 128));
    let heads = vec![nn::linear(&p / "dense5_1", 128, 2, Default::default()), nn::linear(&p / "dense5_2", 128, 4, Default::default())];
    (body, heads)
}

fn onet(vs: &nn::VarStore) -> (nn::Sequential, Vec<nn::Linear>) {
    let p = vs.root();
    let body = nn::seq()
        .add(conv(&p / "conv1", 3, 32, 3))
        .add(prelu(&p / "prelu1", 32))
        .add_fn(pool(3, 2))
        .add(conv(&p / "conv2", 32, 64, 3))
        .add(prelu(&p / "prelu2", 64))
        .add_fn(pool(3, 2))
        .add(conv(&p / "conv3", 64, 64, 3))
        .add(prelu(&p / "prelu3", 64))
        .add_fn(pool(2, 2))
        .add(conv(&p / "conv4", 64, 128, 2))
        .add(prelu(&p / "prelu4", 128))
        .add_fn(flatten_hwc)
        .add(nn::linear(&p / "dense5", 1152, 256, Default::default()))
        .add(prelu(&p / "prelu5", 256));
    let heads = vec![
        nn::linear(&p / "dense6_1", 256, 2, Default::default()),
        nn::linear(&p / "dense6_2", 256, 4, Default::default()),
        nn::linear(&p / "dense6_3", 256, 10, Default::default()),
    ];
    (body, heads)
}

/// The detector: three small networks and the cascade around them.
pub struct Mtcnn {
    pub config: MtcnnConfig,
    device: Device,
    p: (nn::VarStore, nn::Sequential, nn::Conv2D, nn::Conv2D),
    r: Net,
    o: Net,
}

#[derive(Debug, thiserror::Error)]
pub enum MtcnnError {
    #[error("MTCNN weights {path}: {source}")]
    Weights { path: String, source: tch::TchError },
    #[error("MTCNN needs an RGB image, got {0} channel(s)")]
    Channels(u8),
}

/// A candidate between stages: corners, score, and the regression the next step applies.
#[derive(Clone, Copy, Debug)]
struct Cand {
    b: [f32; 4],
    score: f32,
    reg: [f32; 4],
}

impl Mtcnn {
    /// Loads `pnet.safetensors`, `rnet.safetensors` and `onet.safetensors` from `dir`.
    pub fn load(dir: &Path, device: Device, config: MtcnnConfig) -> Result<Self, MtcnnError> {
        let load = |vs: &mut nn::VarStore, name: &str| {
            let path = dir.join(format!("{name}.safetensors"));
            vs.load(&path).map_err(|source| MtcnnError::Weights { path: path.display().to_string(), source })
        };
        let mut pvs = nn::VarStore::new(device);
        let (pbody, p_prob, p_reg) = pnet(&pvs);
        load(&mut pvs, "pnet")?;
        let mut rvs = nn::VarStore::new(device);
        let (body, heads) = rnet(&rvs);
        load(&mut rvs, "rnet")?;
        let mut r = Net { vs: rvs, body, heads };
        let mut ovs = nn::VarStore::new(device);
        let (body, heads) = onet(&ovs);
        load(&mut ovs, "onet")?;
        let mut o = Net { vs: ovs, body, heads };
        for vs in [&mut pvs, &mut r.vs, &mut o.vs] {
            vs.freeze();
        }
        Ok(Mtcnn { config, device, p: (pvs, pbody, p_prob, p_reg), r, o })
    }

    /// Every face in `img` (RGB, samples 0..1), highest score first.
    pub fn detect(&self, img: &Image) -> Result<Vec<Face>, MtcnnError> {
        if img.channels != 3 {
            return Err(MtcnnError::Channels(img.channels));
        }
        let _guard = tch::no_grad_guard();
        let (h, w) = (i64::from(img.height), i64::from(img.width));
        // Back to 0..255 exactly as the 8-bit pixels were, which is what the nets were trained on.
        let pixels: Vec<f32> = img.data.iter().map(|v| (v * 255.0).round()).collect();
        let x = Tensor::from_slice(&pixels).view([1, h, w, 3]).permute([0, 3, 1, 2]).contiguous().to_device(self.device);
        let normalize = |t: Tensor| (t - 127.5) * 0.0078125;

        // Stage 1: the P-Net over an image pyramid.
        let m = 12.0 / self.config.min_face_size;
        let mut minl = h.min(w) as f64 * m;
        let mut scales = Vec::new();
        let mut scale = m;
        while minl >= 12.0 {
            scales.push(scale);
            scale *= self.config.factor;
            minl *= self.config.factor;
        }
        let mut cands: Vec<Cand> = Vec::new();
        for &scale in &scales {
            let size = [(h as f64 * scale + 1.0) as i64, (w as f64 * scale + 1.0) as i64];
            let im = normalize(x.adaptive_avg_pool2d(size));
            let feat = self.p.1.forward(&im);
            let probs = self.p.2.forward(&feat).softmax(1, Kind::Float).to_device(Device::Cpu);
            let reg = self.p.3.forward(&feat).to_device(Device::Cpu);
            let (fh, fw) = (probs.size()[2], probs.size()[3]);
            let probs: Vec<f32> = probs.select(1, 1).flatten(0, -1).try_into().unwrap_or_default();
            let reg: Vec<f32> = reg.flatten(0, -1).try_into().unwrap_or_default();
            let plane = (fh * fw) as usize;
            let scale32 = scale as f32;
            let mut here = Vec::new();
            for (i, &p) in probs.iter().enumerate() {
                if p >= self.config.thresholds[0] {
                    let (yy, xx) = ((i / fw as usize) as f32, (i % fw as usize) as f32);
                    here.push(Cand {
                        b: [
                            ((2.0 * xx + 1.0) / scale32).floor(),
                            ((2.0 * yy + 1.0) / scale32).floor(),
                            ((2.0 * xx + 12.0) / scale32).floor(),
                            ((2.0 * yy + 12.0) / scale32).floor(),
                        ],
                        score: p,
                        reg: [reg[i], reg[plane + i], reg[2 * plane + i], reg[3 * plane + i]],
                    });
                }
            }
            cands.extend(keep(&here, 0.5));
        }
        let cands = keep(&cands, 0.7);
        let boxes: Vec<Cand> = cands
            .iter()
            .map(|c| {
                let (rw, rh) = (c.b[2] - c.b[0], c.b[3] - c.b[1]);
                let b = [c.b[0] + c.reg[0] * rw, c.b[1] + c.reg[1] * rh, c.b[2] + c.reg[2] * rw, c.b[3] + c.reg[3] * rh];
                Cand { b: square(b), score: c.score, reg: [0.0; 4] }
            })
            .collect();

        // Stage 2: the R-Net on 24×24 crops.
        let (boxes, outs) = self.refine(&x, &boxes, 24, &self.r, w, h);
        let mut next = Vec::new();
        if let Some(outs) = outs {
            let reg: Vec<f32> = outs[1].flatten(0, -1).try_into().unwrap_or_default();
            let score: Vec<f32> = outs[0].softmax(1, Kind::Float).select(1, 1).try_into().unwrap_or_default();
            for (k, c) in boxes.iter().enumerate() {
                if score[k] > self.config.thresholds[1] {
                    next.push(Cand { b: c.b, score: score[k], reg: [reg[4 * k], reg[4 * k + 1], reg[4 * k + 2], reg[4 * k + 3]] });
                }
            }
        }
        let boxes: Vec<Cand> = keep(&next, 0.7).into_iter().map(|c| Cand { b: square(calibrate(c.b, c.reg)), ..c }).collect();

        // Stage 3: the O-Net on 48×48 crops, with landmarks.
        let (boxes, outs) = self.refine(&x, &boxes, 48, &self.o, w, h);
        let mut faces = Vec::new();
        if let Some(outs) = outs {
            let score: Vec<f32> = outs[0].softmax(1, Kind::Float).select(1, 1).try_into().unwrap_or_default();
            let reg: Vec<f32> = outs[1].flatten(0, -1).try_into().unwrap_or_default();
            let marks: Vec<f32> = outs[2].flatten(0, -1).try_into().unwrap_or_default();
            let mut passed = Vec::new();
            for (k, c) in boxes.iter().enumerate() {
                if score[k] > self.config.thresholds[2] {
                    let (bw, bh) = (c.b[2] - c.b[0] + 1.0, c.b[3] - c.b[1] + 1.0);
                    let mut landmarks = [(0.0, 0.0); 5];
                    for (j, l) in landmarks.iter_mut().enumerate() {
                        *l = (bw * marks[10 * k + j] + c.b[0] - 1.0, bh * marks[10 * k + 5 + j] + c.b[1] - 1.0);
                    }
                    let reg = [reg[4 * k], reg[4 * k + 1], reg[4 * k + 2], reg[4 * k + 3]];
                    passed.push((Cand { b: calibrate(c.b, reg), score: score[k], reg }, landmarks));
                }
            }
            // The last round counts overlap against the smaller box, with inclusive pixel
            // areas (+1), as the original MATLAB code and facenet-pytorch's numpy NMS do.
            let dets: Vec<Detection> =
                passed.iter().map(|(c, _)| Detection { x1: c.b[0], y1: c.b[1], x2: c.b[2] + 1.0, y2: c.b[3] + 1.0, score: c.score, class: 0 }).collect();
            for i in nms(&dets, 0.7, IouMode::Min) {
                let (c, landmarks) = passed[i];
                faces.push(Face { x1: c.b[0], y1: c.b[1], x2: c.b[2], y2: c.b[3], score: c.score, landmarks });
            }
        }
        Ok(faces)
    }

    /// Crops each box (clamped to the image as `pad` does) resized to `size`², runs `net` on
    /// them in batches of 512; returns the boxes that had a crop and the net's outputs.
    fn refine(&self, x: &Tensor, boxes: &[Cand], size: i64, net: &Net, w: i64, h: i64) -> (Vec<Cand>, Option<Vec<Tensor>>) {
        let mut kept = Vec::new();
        let mut crops = Vec::new();
        for c in boxes {
            let x1 = (c.b[0].trunc() as i64).max(1);
            let y1 = (c.b[1].trunc() as i64).max(1);
            let ex = (c.b[2].trunc() as i64).min(w);
            let ey = (c.b[3].trunc() as i64).min(h);
            if ey > y1 - 1 && ex > x1 - 1 && x1 - 1 < w && y1 - 1 < h {
                let crop = x.narrow(2, y1 - 1, ey - (y1 - 1)).narrow(3, x1 - 1, ex - (x1 - 1));
                crops.push(crop.adaptive_avg_pool2d([size, size]));
                kept.push(*c);
            }
        }
        if crops.is_empty() {
            return (kept, None);
        }
        let input = (Tensor::cat(&crops, 0) - 127.5) * 0.0078125;
        let mut outs: Vec<Vec<Tensor>> = net.heads.iter().map(|_| Vec::new()).collect();
        for chunk in input.split(512, 0) {
            let feat = net.body.forward(&chunk);
            for (i, head) in net.heads.iter().enumerate() {
                outs[i].push(head.forward(&feat).to_device(Device::Cpu));
            }
        }
        (kept, Some(outs.iter().map(|parts| Tensor::cat(parts, 0)).collect()))
    }
}

/// IoU NMS over candidates (torchvision's, as facenet-pytorch's first two stages use),
/// keeping the survivors in score order.
fn keep(cands: &[Cand], threshold: f32) -> Vec<Cand> {
    let dets: Vec<Detection> = cands.iter().map(|c| Detection { x1: c.b[0], y1: c.b[1], x2: c.b[2], y2: c.b[3], score: c.score, class: 0 }).collect();
    nms(&dets, threshold, IouMode::Union).into_iter().map(|i| cands[i]).collect()
}

/// The box made square around its centre (the nets expect square crops).
fn square(b: [f32; 4]) -> [f32; 4] {
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    let l = w.max(h);
    let x1 = b[0] + w * 0.5 - l * 0.5;
    let y1 = b[1] + h * 0.5 - l * 0.5;
    [x1, y1, x1 + l, y1 + l]
}

/// Applies a stage's box regression (offsets relative to the inclusive box size).
fn calibrate(b: [f32; 4], reg: [f32; 4]) -> [f32; 4] {
    let (w, h) = (b[2] - b[0] + 1.0, b[3] - b[1] + 1.0);
    [b[0] + reg[0] * w, b[1] + reg[1] * h, b[2] + reg[2] * w, b[3] + reg[3] * h]
}
