//! SGD and Adam over a list of parameters, with state we can checkpoint.
//!
//! tch's optimizers keep their momentum buffers inside libtorch where they cannot be saved, so
//! a resumed run would restart momentum from zero and drift from an uninterrupted one. These
//! keep every buffer as a named tensor: a checkpoint holds them and a resume continues exactly.
//! The update rules are PyTorch's (`torch.optim.SGD`, `torch.optim.Adam`, L2 weight decay added
//! to the gradient), so the side-by-side benchmark compares like with like.

use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSpec {
    Sgd {
        lr: f64,
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default)]
        nesterov: bool,
    },
    Adam {
        lr: f64,
        #[serde(default = "beta1")]
        beta1: f64,
        #[serde(default = "beta2")]
        beta2: f64,
        #[serde(default = "eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
    },
}

fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.999
}
fn eps() -> f64 {
    1e-8
}

impl OptimizerSpec {
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerSpec::Sgd { lr, .. } | OptimizerSpec::Adam { lr, .. } => *lr,
        }
    }

    pub fn with_lr(&self, new: f64) -> Self {
        let mut s = self.clone();
        match &mut s {
            OptimizerSpec::Sgd { lr, .. } | OptimizerSpec::Adam { lr, .. } => *lr = new,
        }
        s
    }

    pub fn validate(&self, errors: &mut Vec<String>) {
        let lr = self.lr();
        if !(lr > 0.0 && lr.is_finite()) {
            errors.push(format!("optimizer.lr: a positive number, got {lr}"));
        }
        match self {
            OptimizerSpec::Sgd { momentum, weight_decay, nesterov, .. } => {
                if !(0.0..1.0).contains(momentum) {
                    errors.push(format!("optimizer.momentum: in [0, 1), got {momentum}"));
                }
                if !(weight_decay.is_finite() && *weight_decay >= 0.0) {
                    errors.push("optimizer.weight_decay: a finite number, not negative".into());
                }
                if *nesterov && *momentum == 0.0 {
                    errors.push("optimizer.nesterov: needs momentum > 0".into());
                }
            }
            OptimizerSpec::Adam { beta1, beta2, eps, weight_decay, .. } => {
                for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
                    if !(0.0..1.0).contains(b) {
                        errors.push(format!("optimizer.{name}: in [0, 1), got {b}"));
                    }
                }
                if !(eps.is_finite() && *eps > 0.0) {
                    errors.push("optimizer.eps: a finite positive number".into());
                }
                if !(weight_decay.is_finite() && *weight_decay >= 0.0) {
                    errors.push("optimizer.weight_decay: a finite number, not negative".into());
                }
            }
        }
    }
}

/// How the learning rate moves over the run, evaluated per epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    #[default]
    Constant,
    /// Multiply by `gamma` every `every_epochs`.
    Step { every_epochs: u32, gamma: f64 },
    /// Cosine from the base rate towards `min_lr`, as PyTorch's `CosineAnnealingLR` with
    /// `T_max = epochs`: epoch `e` gets `min_lr + (lr - min_lr)(1 + cos(π e / epochs)) / 2`.
    Cosine {
        #[serde(default)]
        min_lr: f64,
    },
}

impl Schedule {
    pub fn lr(&self, base: f64, epoch: u32, epochs: u32) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Step { every_epochs, gamma } => base * gamma.powi((epoch / every_epochs.max(1)) as i32),
            Schedule::Cosine { min_lr } => {
                let t = f64::from(epoch) / f64::from(epochs.max(1));
                min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    pub fn validate(&self, base_lr: f64, errors: &mut Vec<String>) {
        match self {
            Schedule::Step { every_epochs, gamma } => {
                if *every_epochs == 0 {
                    errors.push("schedule.every_epochs: at least 1".into());
                }
                if !(gamma.is_finite() && *gamma > 0.0 && *gamma <= 1.0) {
                    errors.push(format!("schedule.gamma: in (0, 1], got {gamma}"));
                }
            }
            Schedule::Cosine { min_lr } if !(min_lr.is_finite() && *min_lr >= 0.0 && *min_lr <= base_lr) => {
                errors.push(format!("schedule.min_lr: between 0 and the learning rate ({base_lr}), got {min_lr}"))
            }
            _ => {}
        }
    }
}

/// The optimizer and its per-parameter state.
pub struct Optimizer {
    spec: OptimizerSpec,
    params: Vec<Tensor>,
    /// SGD: momentum buffers; Adam: first moments.
    first: Vec<Tensor>,
    /// Adam: second moments.
    second: Vec<Tensor>,
    step: i64,
}

impl Optimizer {
    pub fn new(spec: OptimizerSpec, params: Vec<Tensor>) -> Self {
        let zeros = |ps: &[Tensor]| ps.iter().map(Tensor::zeros_like).collect::<Vec<_>>();
        let first = zeros(&params);
        let second = match spec {
            OptimizerSpec::Adam { .. } => zeros(&params),
            OptimizerSpec::Sgd { .. } => Vec::new(),
        };
        Optimizer { spec, params, first, second, step: 0 }
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    /// One update with learning rate `lr` from the gradients now in the parameters.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let t = self.step as f64;
        for i in 0..self.params.len() {
            let grad = self.params[i].grad();
            if !grad.defined() {
                continue;
            }
            match self.spec {
                OptimizerSpec::Sgd { momentum, weight_decay, nesterov, .. } => {
                    let g = if weight_decay != 0.0 { &grad + weight_decay * &self.params[i] } else { grad };
                    let update = if momentum != 0.0 {
                        // PyTorch: the first step copies the gradient into the buffer.
                        if self.step == 1 {
                            self.first[i].copy_(&g);
                        } else {
                            let _ = self.first[i].g_mul_scalar_(momentum).g_add_(&g);
                        }
                        if nesterov {
                            &g + momentum * &self.first[i]
                        } else {
                            self.first[i].shallow_clone()
                        }
                    } else {
                        g
                    };
                    let _ = self.params[i].g_sub_(&(update * lr));
                }
                OptimizerSpec::Adam { beta1, beta2, eps, weight_decay, .. } => {
                    // In place where libtorch allows it: this runs once per parameter per step.
                    let g = if weight_decay != 0.0 { &grad + weight_decay * &self.params[i] } else { grad };
                    let _ = self.first[i].lerp_(&g, 1.0 - beta1);
                    let _ = self.second[i].g_mul_scalar_(beta2).addcmul_(&g, &(&g * (1.0 - beta2)));
                    let mut denom = self.second[i].sqrt();
                    let _ = denom.g_div_scalar_((1.0 - beta2.powf(t)).sqrt()).g_add_scalar_(eps);
                    let step = lr / (1.0 - beta1.powf(t));
                    let _ = self.params[i].addcdiv_(&(&self.first[i] * -step), &denom);
                }
            }
        }
    }

    pub fn steps_taken(&self) -> i64 {
        self.step
    }

    /// Named copies of the state, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("optim.step".to_owned(), Tensor::from_slice(&[self.step]))];
        out.extend(self.first.iter().enumerate().map(|(i, t)| (format!("optim.first.{i}"), t.to_device(tch::Device::Cpu))));
        out.extend(self.second.iter().enumerate().map(|(i, t)| (format!("optim.second.{i}"), t.to_device(tch::Device::Cpu))));
        out
    }

    /// Restores what [`Optimizer::state`] saved; the parameter list must be the same network's.
    pub fn restore(&mut self, named: &std::collections::HashMap<String, Tensor>) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        let step = named.get("optim.step").ok_or("checkpoint has no optimizer step")?;
        self.step = step.int64_value(&[0]);
        for (prefix, bufs) in [("first", &mut self.first), ("second", &mut self.second)] {
            for (i, buf) in bufs.iter_mut().enumerate() {
                let saved = named.get(&format!("optim.{prefix}.{i}")).ok_or_else(|| format!("checkpoint lacks optim.{prefix}.{i}"))?;
                if saved.size() != buf.size() {
                    return Err(format!("optim.{prefix}.{i}: shape {:?} in the checkpoint, {:?} in the model", saved.size(), buf.size()));
                }
                buf.copy_(saved);
            }
        }
        Ok(())
    }
}
