// The demo page of a model served on leased cards: the chosen image goes to the service's own
// /v1/predict on this origin, and its classes are listed best first.
"use strict";
const input = document.getElementById("image");
const preview = document.getElementById("preview");
const result = document.getElementById("result");
input.addEventListener("change", async () => {
  const file = input.files[0];
  if (!file) return;
  preview.src = URL.createObjectURL(file);
  result.textContent = "…";
  delete result.dataset.done;
  delete result.dataset.error;
  let answer, body;
  try {
    answer = await fetch("/v1/predict", { method: "POST", body: file });
    body = await answer.json();
  } catch (e) {
    result.dataset.error = "NETWORK";
    result.textContent = String(e);
    return;
  }
  result.textContent = "";
  if (!answer.ok) {
    result.dataset.error = (body.error && body.error.code) || String(answer.status);
    result.textContent = (body.error && body.error.message) || answer.statusText;
    return;
  }
  result.dataset.class = body.result.class;
  for (const [name, score] of body.result.top || []) {
    const item = document.createElement("li");
    item.dataset.class = name;
    item.textContent = `${name} — ${(score * 100).toFixed(1)}%`;
    result.appendChild(item);
  }
  result.dataset.done = "1";
});
