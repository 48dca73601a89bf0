//! The classification networks a training job can ask for.

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// The architecture, as written in a job spec and stored beside the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    /// Two 3×3 convolutions, 2×2 max-pool, a 128-unit hidden layer: enough for digits-sized
    /// inputs, and the network the PyTorch side-by-side benchmark mirrors layer for layer.
    SmallCnn {
        #[serde(default = "default_small_width")]
        width: i64,
    },
    /// ResNet-18's layout (four stages of two basic blocks, batch norm, identity shortcuts),
    /// with a configurable base width (64 is the original); small inputs (< 64 px) get a 3×3
    /// stem without the initial max-pool, as CIFAR-style ResNets do.
    ResNet18 {
        #[serde(default = "default_resnet_width")]
        width: i64,
    },
}

fn default_small_width() -> i64 {
    32
}
fn default_resnet_width() -> i64 {
    64
}

impl ModelSpec {
    pub fn validate(&self) -> Result<(), String> {
        let width = match self {
            ModelSpec::SmallCnn { width } | ModelSpec::ResNet18 { width } => *width,
        };
        if !(1..=1024).contains(&width) {
            return Err(format!("model.width: between 1 and 1024, got {width}"));
        }
        Ok(())
    }

    /// Builds the network under `p` for `channels`×`size`×`size` inputs and `classes` outputs.
    pub fn build(&self, p: &nn::Path, channels: i64, size: i64, classes: i64) -> Network {
        let (features, feature_dim) = match *self {
            ModelSpec::SmallCnn { width } => (small_cnn_features(p, channels, width), SMALL_CNN_HIDDEN),
            ModelSpec::ResNet18 { width } => (resnet18_features(p, channels, size, width), 8 * width),
        };
        let head_name = match self {
            ModelSpec::SmallCnn { .. } => "fc2",
            ModelSpec::ResNet18 { .. } => "fc",
        };
        let head = nn::linear(p / head_name, feature_dim, classes, Default::default());
        Network { features, head, feature_dim }
    }

    /// A short name for model versions (`resnet18w32`).
    pub fn tag(&self) -> String {
        match self {
            ModelSpec::SmallCnn { width } => format!("small_cnn_w{width}"),
            ModelSpec::ResNet18 { width } => format!("resnet18w{width}"),
        }
    }
}

/// A network split where image search needs it: `features` is everything up to the last layer
/// (the pooled representation similar-image search indexes), `head` the classifier on top. The
/// variable names are those of the whole network, so checkpoints load either way.
#[derive(Debug)]
pub struct Network {
    pub features: nn::SequentialT,
    pub head: nn::Linear,
    pub feature_dim: i64,
}

impl ModuleT for Network {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        xs.apply_t(&self.features, train).apply(&self.head)
    }
}

const SMALL_CNN_HIDDEN: i64 = 128;

fn small_cnn_features(p: &nn::Path, channels: i64, width: i64) -> nn::SequentialT {
    let pad = nn::ConvConfig { padding: 1, ..Default::default() };
    nn::seq_t()
        .add(nn::conv2d(p / "conv1", channels, width, 3, pad))
        .add_fn(|x| x.relu())
        .add(nn::conv2d(p / "conv2", width, 2 * width, 3, pad))
        .add_fn(|x| x.relu().max_pool2d_default(2))
        // Inputs larger than 8×8 are pooled to the 4×4 grid the hidden layer expects.
        .add_fn(|x| if x.size()[2] == 4 && x.size()[3] == 4 { x.shallow_clone() } else { x.adaptive_avg_pool2d([4, 4]) })
        .add_fn(|x| x.flatten(1, -1))
        .add(nn::linear(p / "fc1", 2 * width * 16, SMALL_CNN_HIDDEN, Default::default()))
        .add_fn(|x| x.relu())
}

fn conv_bn(p: &nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> nn::SequentialT {
    let conv = nn::ConvConfig { stride, padding: k / 2, bias: false, ..Default::default() };
    nn::seq_t().add(nn::conv2d(p / "conv", cin, cout, k, conv)).add(nn::batch_norm2d(p / "bn", cout, Default::default()))
}

fn basic_block(p: &nn::Path, cin: i64, cout: i64, stride: i64) -> impl ModuleT {
    let first = conv_bn(&(p / "a"), cin, cout, 3, stride);
    let second = conv_bn(&(p / "b"), cout, cout, 3, 1);
    let shortcut = (stride != 1 || cin != cout).then(|| conv_bn(&(p / "shortcut"), cin, cout, 1, stride));
    nn::func_t(move |x, train| {
        let y = x.apply_t(&first, train).relu().apply_t(&second, train);
        let identity = match &shortcut {
            Some(s) => x.apply_t(s, train),
            None => x.shallow_clone(),
        };
        (y + identity).relu()
    })
}

fn resnet18_features(p: &nn::Path, channels: i64, size: i64, width: i64) -> nn::SequentialT {
    let small = size < 64;
    let mut net = if small {
        nn::seq_t().add(conv_bn(&(p / "stem"), channels, width, 3, 1)).add_fn(|x| x.relu())
    } else {
        nn::seq_t().add(conv_bn(&(p / "stem"), channels, width, 7, 2)).add_fn(|x| x.relu().max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false))
    };
    let mut cin = width;
    for (stage, mult) in [1, 2, 4, 8].into_iter().enumerate() {
        let cout = width * mult;
        for block in 0..2 {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            net = net.add(basic_block(&(p / format!("layer{}", stage + 1) / block), cin, cout, stride));
            cin = cout;
        }
    }
    net.add_fn(|x| x.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
}

/// Parameters in a network (for logs and the model card).
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(Tensor::numel).map(|n| n as i64).sum()
}
