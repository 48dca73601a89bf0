"""Writes the CV tests' real data into the folder given as the only argument.

- digits/images/<label>/<n>.png: scikit-learn's copy of the UCI handwritten digits (1,797
  8x8 grayscale images, 0..16 scaled to 0..255), labels as folder names.
- mtcnn/{pnet,rnet,onet}.safetensors: facenet-pytorch's pretrained MTCNN weights, converted
  from its pickled state dicts (tch reads safetensors without Python).
- faces/*.png and faces/reference.json: real photos from scikit-image (the astronaut portrait,
  variants of it scaled, mirrored and pasted into other photos, and photos without faces)
  with the boxes facenet-pytorch's MTCNN finds on each, the reference our detector must match.
- torchscript/: a small model exported with torch.jit.trace, one input and PyTorch's output,
  to prove exported TorchScript models load in our inference path.
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image


def digits(out):
    from sklearn.datasets import load_digits

    d = load_digits()
    for n, (img, label) in enumerate(zip(d.images, d.target)):
        folder = os.path.join(out, "digits", "images", str(label))
        os.makedirs(folder, exist_ok=True)
        pixels = np.round(img * 255.0 / 16.0).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{n:04d}.png"))


def mtcnn_weights(out):
    import facenet_pytorch
    from safetensors.torch import save_file

    data = os.path.join(os.path.dirname(facenet_pytorch.__file__), "data")
    os.makedirs(os.path.join(out, "mtcnn"), exist_ok=True)
    for net in ("pnet", "rnet", "onet"):
        state = torch.load(os.path.join(data, f"{net}.pt"), map_location="cpu")
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "mtcnn", f"{net}.safetensors"))


def faces(out):
    import skimage.data
    from facenet_pytorch import MTCNN

    folder = os.path.join(out, "faces")
    os.makedirs(folder, exist_ok=True)
    astronaut = Image.fromarray(skimage.data.astronaut())
    face = astronaut.crop((150, 30, 300, 200))
    coffee = Image.fromarray(skimage.data.coffee())
    composite = coffee.copy()
    composite.paste(face, (40, 60))
    composite.paste(face.resize((90, 102)), (420, 200))
    images = {
        "astronaut": astronaut,
        "astronaut_half": astronaut.resize((256, 256), Image.BILINEAR),
        "astronaut_mirrored": astronaut.transpose(Image.FLIP_LEFT_RIGHT),
        "astronaut_wide": astronaut.resize((700, 420), Image.BILINEAR),
        "coffee_two_faces": composite,
        "coffee": coffee,
        "chelsea": Image.fromarray(skimage.data.chelsea()),
        "rocket": Image.fromarray(skimage.data.rocket()),
        "camera": Image.fromarray(skimage.data.camera()).convert("RGB"),
    }
    detector = MTCNN(keep_all=True, device="cpu")
    reference = {}
    for name, img in images.items():
        img.save(os.path.join(folder, f"{name}.png"))
        boxes, probs = detector.detect(img)
        reference[f"{name}.png"] = [] if boxes is None else [
            {"box": [float(v) for v in b], "score": float(p)} for b, p in zip(boxes, probs)
        ]
        print(f"  {name}: {len(reference[f'{name}.png'])} face(s)")
    with open(os.path.join(folder, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1, sort_keys=True)


def torchscript(out):
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10)
    ).eval()
    example = torch.rand(2, 1, 8, 8)
    folder = os.path.join(out, "torchscript")
    os.makedirs(folder, exist_ok=True)
    traced = torch.jit.trace(model, example)
    traced.save(os.path.join(folder, "digits_conv.pt"))
    with torch.no_grad():
        expected = model(example)
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump({"input": example.flatten().tolist(), "input_shape": list(example.shape),
                   "output": expected.flatten().tolist(), "output_shape": list(expected.shape)}, f)


class ToyDetector(torch.nn.Module):
    """A detector-shaped TorchScript module: N x 6 rows (x1, y1, x2, y2, score, class) in
    input pixels, boxes relative to the input size and scores scaled by its mean brightness,
    so the post-processing path (class filter, score threshold, per-class NMS) has overlapping
    boxes of several classes to work on."""

    def forward(self, x):
        h, w = float(x.shape[2]), float(x.shape[3])
        rel = torch.tensor([[0.10, 0.10, 0.50, 0.50], [0.12, 0.10, 0.52, 0.50], [0.60, 0.60, 0.90, 0.90],
                            [0.60, 0.60, 0.90, 0.90], [0.00, 0.00, 0.20, 0.20], [0.55, 0.58, 0.88, 0.90]])
        boxes = rel * torch.tensor([w, h, w, h])
        scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.3, 0.65]) * (0.5 + x.mean())
        classes = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
        return torch.cat([boxes, scores.unsqueeze(1), classes.unsqueeze(1)], dim=1)


def detector(out):
    """The toy detector and torchvision's post-processing of its output on the astronaut."""
    import skimage.data
    import torchvision

    folder = os.path.join(out, "torchscript")
    scripted = torch.jit.script(ToyDetector())
    scripted.save(os.path.join(folder, "toy_detector.pt"))
    img = torch.from_numpy(skimage.data.astronaut().copy()).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
    rows = scripted(img)
    min_score, iou, keep_classes = 0.5, 0.5, [0, 1]
    mask = (rows[:, 4] >= min_score) & torch.isin(rows[:, 5].long(), torch.tensor(keep_classes))
    kept = rows[mask]
    order = torchvision.ops.batched_nms(kept[:, :4], kept[:, 4], kept[:, 5].long(), iou)
    with open(os.path.join(folder, "toy_detector_expected.json"), "w") as f:
        json.dump({"min_score": min_score, "iou": iou, "rows": kept[order].tolist()}, f)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    digits(out)
    mtcnn_weights(out)
    faces(out)
    torchscript(out)
    detector(out)
