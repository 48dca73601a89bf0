//! From images to tensors: a labelled sample set, batches, and the conversion both ways.

use tch::{Device, Kind, Tensor};

use crate::image::Image;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("no images")]
    Empty,
    #[error("{name}: {got_w}×{got_h}×{got_c}, but the set's images are {w}×{h}×{c}; add a resize (and grayscale) step")]
    Shape { name: String, got_w: u32, got_h: u32, got_c: u8, w: u32, h: u32, c: u8 },
}

/// Images as one `N×C×H×W` float tensor (CPU). All images must have the same shape.
pub fn images_to_tensor<'a>(images: impl IntoIterator<Item = (&'a str, &'a Image)>) -> Result<Tensor, DataError> {
    let mut iter = images.into_iter().peekable();
    let (_, first) = *iter.peek().ok_or(DataError::Empty)?;
    let (w, h, c) = (first.width, first.height, first.channels);
    let plane = w as usize * h as usize;
    let mut buf: Vec<f32> = Vec::new();
    let mut n = 0i64;
    for (name, img) in iter {
        if (img.width, img.height, img.channels) != (w, h, c) {
            return Err(DataError::Shape { name: name.to_owned(), got_w: img.width, got_h: img.height, got_c: img.channels, w, h, c });
        }
        // HWC (interleaved) to CHW (planar).
        let start = buf.len();
        buf.resize(start + plane * c as usize, 0.0);
        let out = &mut buf[start..];
        for (i, px) in img.data.chunks_exact(c as usize).enumerate() {
            for (ch, v) in px.iter().enumerate() {
                out[ch * plane + i] = *v;
            }
        }
        n += 1;
    }
    Ok(Tensor::from_slice(&buf).view([n, i64::from(c), i64::from(h), i64::from(w)]))
}

/// One image from a `C×H×W` float tensor (values as they are; clamp when saving).
pub fn tensor_to_image(t: &Tensor) -> Image {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let size = t.size();
    let (c, h, w) = (size[0], size[1], size[2]);
    let planar: Vec<f32> = t.flatten(0, -1).try_into().unwrap_or_default();
    let plane = (h * w) as usize;
    let mut img = Image::new(w as u32, h as u32, c as u8);
    for i in 0..plane {
        for ch in 0..c as usize {
            img.data[i * c as usize + ch] = planar[ch * plane + i];
        }
    }
    img
}

/// A labelled set, held as one tensor when no per-epoch augmentation needs the images.
pub struct Samples {
    pub names: Vec<String>,
    pub images: Vec<Image>,
    pub labels: Vec<i64>,
    tensor: Tensor,
}

impl Samples {
    pub fn new(names: Vec<String>, images: Vec<Image>, labels: Vec<i64>) -> Result<Self, DataError> {
        let tensor = images_to_tensor(names.iter().map(String::as_str).zip(images.iter()))?;
        Ok(Samples { names, images, labels, tensor })
    }

    /// A set with nothing in it (an empty split).
    pub fn empty() -> Self {
        Samples { names: Vec::new(), images: Vec::new(), labels: Vec::new(), tensor: Tensor::zeros([0, 1, 1, 1], (Kind::Float, Device::Cpu)) }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `[channels, height, width]` of every sample.
    pub fn shape(&self) -> [i64; 3] {
        let s = self.tensor.size();
        [s[1], s[2], s[3]]
    }

    /// The rows `idx` as a batch (inputs, labels) on the CPU.
    pub fn batch(&self, idx: &[i64]) -> (Tensor, Tensor) {
        let index = Tensor::from_slice(idx);
        let ys = Tensor::from_slice(&self.labels).index_select(0, &index);
        (self.tensor.index_select(0, &index), ys)
    }

    pub fn all(&self) -> (Tensor, Tensor) {
        (self.tensor.shallow_clone(), Tensor::from_slice(&self.labels))
    }
}
