// A lease's terminal in the browser: xterm.js on this page, a login shell of the lease's user at
// the other end of the WebSocket /pty on this origin. Keystrokes go as binary frames, the
// terminal's size as {"cols", "rows"}; the shell's output comes back as binary frames.
"use strict";
const screen = document.getElementById("terminal");
const status = document.getElementById("status");
const term = new Terminal({ cursorBlink: true, scrollback: 5000, fontFamily: "monospace" });
const fit = new FitAddon.FitAddon();
term.loadAddon(fit);
term.open(screen);
fit.fit();
const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/pty`);
socket.binaryType = "arraybuffer";
const encoder = new TextEncoder();
const size = () => socket.readyState === WebSocket.OPEN && socket.send(JSON.stringify({ cols: term.cols, rows: term.rows }));
socket.onopen = () => {
  status.dataset.state = "open";
  status.textContent = "";
  size();
  term.focus();
};
socket.onmessage = (event) => term.write(new Uint8Array(event.data));
socket.onclose = () => {
  status.dataset.state = "closed";
  status.textContent = "The shell has ended. Reload the page for a new one. 会话已结束，刷新页面可开启新的会话。";
};
term.onData((data) => socket.readyState === WebSocket.OPEN && socket.send(encoder.encode(data)));
window.addEventListener("resize", () => {
  fit.fit();
  size();
});
// What the terminal shows, for tests and screen readers: its buffer as text.
window.terminalText = () => {
  const buffer = term.buffer.active;
  const lines = [];
  for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
  return lines.join("\n");
};
