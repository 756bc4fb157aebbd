// camface serve: the page. Sends new camera frames as JPEG over the WebSocket (at most WINDOW
// unanswered, counted by sequence numbers: the server drops stale frames and answers only the
// newest), draws the annotated frames that come back on #view, and drives the side panel.
// Stable contract for tests and automation: #view, window.camface.stats =
// {framesSent, framesShown, lastLatencyMs, method}.
"use strict";

const WINDOW = 2;
const RETRY_MS = 3000;  // between attempts to reconnect
const PANEL_EVERY_MS = 250;  // the side panel's refresh: layout costs the browser CPU the frames need
// Snapshot downloads offered, newest first: each holds its JPEG in the page's memory through an
// object URL, so an older one's link goes and its URL is revoked (the server keeps its folder).
const SNAPSHOTS_KEPT = 20;
const CAMERA_ERRORS = {  // getUserMedia's errors, by name, as the user can act on them
  NotAllowedError: "camera not allowed (allow it for this site, then reload)",
  NotFoundError: "no camera found", OverconstrainedError: "no camera found",
  NotReadableError: "camera busy or broken (another program may hold it)",
};
const token = new URLSearchParams(location.search).get("token");
const query = token ? `?token=${encodeURIComponent(token)}` : "";
const stats = { framesSent: 0, framesShown: 0, lastLatencyMs: null, method: null };
const camface = window.camface = { stats, latenciesMs: [], bytesSent: 0, bytesReceived: 0, last: null,
                                   hello: null, notes: [], error: null, cameraFrames: 0, encodeMs: null,
                                   drawMs: null };
const $ = (id) => document.getElementById(id);
const view = $("view"), viewContext = view.getContext("2d");
const video = $("camera");
const grab = document.createElement("canvas"), grabContext = grab.getContext("2d");
let socket = null, sent = 0, answered = 0, drawn = 0, encoding = false, recording = false;
const sentAt = new Map();
const shownAt = [];
let lastJpeg = null, labels = [], panelAt = 0;
let connections = 0, retry = false, closedAt = 0;
let cameraStopped = null;  // why the camera ended, once it has: it outlasts the socket's own news
const snapshotLinks = [];  // the snapshot downloads offered, oldest first

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
  if (error) camface.error = text;
}

async function start() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    status("no camera here: browsers allow it only on https or localhost (use ssh -L 8000:localhost:8000, " +
           "or camface serve --ssl-certfile/--ssl-keyfile)", true);
    return;
  }
  try {
    video.srcObject = await navigator.mediaDevices.getUserMedia(
      { video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } }, audio: false });
    video.srcObject.getVideoTracks()[0].addEventListener("ended", () => {
      cameraStopped = "camera stopped (unplugged, or taken by another program): reload the page once it is back";
      status(cameraStopped, true);
    });
    await video.play();
  } catch (error) {
    status(`${CAMERA_ERRORS[error.name] ?? "camera failed"}: ${error.message}`, true);
    return;
  }
  connect();
  video.requestVideoFrameCallback(onCameraFrame);
}

// A new socket starts a new sequence: nothing is in flight or drawn on it yet.
function connect() {
  connections += 1;
  sent = answered = drawn = 0;
  sentAt.clear();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws${query}`);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => status("connected");
  socket.onmessage = onMessage;
  socket.onclose = onClose;
}

// Closed as idle (the camera sent nothing: a hidden tab, a sleeping laptop), by a server
// restarting (1012) or full (1013), or a lost connection (1006): reconnect once the camera has
// a new frame, at most every RETRY_MS. A refusal, a bad message or a server error stays closed.
function onClose(event) {
  status(cameraStopped ?? `disconnected (${event.code}${event.reason ? ": " + event.reason : ""})`,
         cameraStopped !== null || event.code !== 1000);
  setRecording(false);  // the server finalised it: this socket's recording is over
  retry = [1006, 1012, 1013].includes(event.code) || (event.code === 1008 && event.reason.startsWith("idle:"));
  closedAt = performance.now();
}

// Only new camera frames are sent, and only while fewer than WINDOW are unanswered.
function onCameraFrame() {
  video.requestVideoFrameCallback(onCameraFrame);
  camface.cameraFrames += 1;
  if (retry && socket.readyState === WebSocket.CLOSED && performance.now() - closedAt >= RETRY_MS) {
    retry = false;
    connect();
  }
  if (!socket || socket.readyState !== WebSocket.OPEN || encoding || sent - answered >= WINDOW) return;
  encoding = true;
  const started = performance.now();
  const width = video.videoWidth, height = video.videoHeight;
  if (grab.width !== width || grab.height !== height) { grab.width = width; grab.height = height; }
  grabContext.drawImage(video, 0, 0, width, height);
  grab.toBlob(async (blob) => {
    try {
      const body = new Uint8Array(await blob.arrayBuffer());
      const message = new Uint8Array(4 + body.length);
      new DataView(message.buffer).setUint32(0, sent + 1);
      message.set(body, 4);
      if (socket.readyState !== WebSocket.OPEN) return;
      sent += 1;
      const now = performance.now();
      camface.encodeMs = now - started;
      sentAt.set(sent, now);
      socket.send(message);
      stats.framesSent += 1;
      camface.bytesSent += body.length;
    } finally {
      encoding = false;
    }
  }, "image/jpeg", 0.8);
}

function onMessage(event) {
  if (typeof event.data === "string") { onNote(JSON.parse(event.data)); return; }
  const data = event.data;
  const length = new DataView(data).getUint32(0);
  const result = JSON.parse(new TextDecoder().decode(new Uint8Array(data, 4, length)));
  const jpeg = new Blob([new Uint8Array(data, 4 + length)], { type: "image/jpeg" });
  camface.bytesReceived += data.byteLength - 4 - length;
  lastJpeg = jpeg;  // now, not once drawn: a snapshot note comes right after its frame, maybe before the draw
  // Frames the server dropped as stale are answered by a newer one: everything up to seq is done.
  answered = Math.max(answered, result.seq);
  const sentTime = sentAt.get(result.seq);
  for (const seq of sentAt.keys()) if (seq <= result.seq) sentAt.delete(seq);
  const received = performance.now(), connection = connections;
  createImageBitmap(jpeg).then((bitmap) => {
    if (connection !== connections || result.seq <= drawn) {  // an older frame decoded late
      bitmap.close();  // its pixels live outside the JavaScript heap: release them now, as a drawn one's
      return;
    }
    drawn = result.seq;
    if (view.width !== bitmap.width || view.height !== bitmap.height) {
      view.width = bitmap.width; view.height = bitmap.height;
    }
    viewContext.drawImage(bitmap, 0, 0);
    bitmap.close();
    const now = performance.now();
    camface.drawMs = now - received;
    if (sentTime !== undefined) {
      stats.lastLatencyMs = now - sentTime;
      camface.latenciesMs.push(stats.lastLatencyMs);
      if (camface.latenciesMs.length > 5000) camface.latenciesMs.shift();
    }
    stats.framesShown += 1;
    stats.method = result.method;
    camface.last = result;
    shownAt.push(now);
    while (shownAt.length && now - shownAt[0] > 1000) shownAt.shift();
    if (now - panelAt >= PANEL_EVERY_MS) { panelAt = now; panel(result); }
  });
}

function onNote(note) {
  camface.notes.push(note);
  if (note.type === "hello") {
    // a reconnection keeps what the user chose (when the server still offers it) and tells the server
    const again = camface.hello !== null;
    camface.hello = note;
    labels = note.labels;
    const method = $("method"), klass = $("class");
    const names = [...note.methods, "none"];
    const chosen = again && names.includes(method.value) ? method.value : note.method;
    const k = again && Number(klass.value) < labels.length ? klass.value : "";
    method.replaceChildren(...names.map((name) => new Option(name, name, false, name === chosen)));
    klass.replaceChildren(new Option("predicted", "", false, k === ""),
                          ...labels.map((label, i) => new Option(`${i}: ${label}`, String(i), false, String(i) === k)));
    if (again) sendControls(); else $("smooth").checked = note.smooth;
  } else if (note.type === "snapshot") {
    snapshotLinks.push(link(URL.createObjectURL(lastJpeg), `${note.folder}.jpg`,
                            `snapshot ${note.folder} (annotated frame)`));
    while (snapshotLinks.length > SNAPSHOTS_KEPT) {
      const oldest = snapshotLinks.shift();
      URL.revokeObjectURL(oldest.href);
      oldest.remove();
    }
  } else if (note.type === "recording") {
    setRecording(true);
  } else if (note.type === "recorded") {
    setRecording(false);
    if (note.url) link(note.url + query, note.file, `${note.file} (${note.frames} frames)`);
  }
}

function setRecording(on) {
  recording = on;
  $("record").textContent = on ? "stop" : "record"; $("record").className = on ? "on" : "";
}

function link(href, filename, text) {
  const a = document.createElement("a");
  a.href = href; a.download = filename; a.textContent = text;
  $("downloads").prepend(a);
  return a;
}

function panel(result) {
  const latency = stats.lastLatencyMs === null ? "-" : stats.lastLatencyMs.toFixed(0);
  const stages = Object.entries(result.stage_ms).map(([k, v]) => `${k} ${v.toFixed(1)}`).join(", ");
  const provider = camface.hello ? camface.hello.provider.replace("ExecutionProvider", "") : "";
  const browser = `browser ms: encode ${(camface.encodeMs ?? 0).toFixed(1)}, decode+draw ${camface.drawMs.toFixed(1)}`;
  $("speed").innerHTML = `${shownAt.length} fps, latency ${latency} ms<br>${result.frames_dropped} stale frames ` +
    `dropped; ${result.batch_frames} frame(s) per graph call<br>server ms: ${stages}<br>${browser}<br>${provider}`;
  const faces = $("faces");
  faces.replaceChildren();
  if (!result.faces.length) faces.textContent = "no face";
  result.faces.forEach((face, i) => {
    const box = document.createElement("div");
    box.className = "face";
    box.append(`face ${i + 1}: ${face.predicted_label ?? labels[face.predicted] ?? face.predicted}`);
    const order = face.probs.map((p, k) => k).sort((a, b) => face.probs[b] - face.probs[a]).slice(0, 5);
    for (const k of order) {
      const row = document.createElement("div");
      row.className = "bar" + (k === face.explained ? " explained" : "");
      row.innerHTML = `<span></span><div class="track"><div class="fill"></div></div><span></span>`;
      row.children[0].textContent = labels[k] ?? k;
      row.querySelector(".fill").style.width = `${(face.probs[k] * 100).toFixed(1)}%`;
      row.children[2].textContent = face.probs[k].toFixed(2);
      box.append(row);
    }
    faces.append(box);
  });
}

function sendControls() {
  if (!socketOpen()) return;
  const k = $("class").value;
  socket.send(JSON.stringify({ type: "controls", method: $("method").value,
                               explained_class: k === "" ? null : Number(k),
                               hud: $("hud").checked, smooth: $("smooth").checked }));
}

for (const id of ["method", "class", "hud", "smooth"]) $(id).addEventListener("change", sendControls);
const socketOpen = () => socket && socket.readyState === WebSocket.OPEN;
$("snapshot").addEventListener("click", () => socketOpen() && socket.send(JSON.stringify({ type: "snapshot" })));
$("record").addEventListener("click", () => {
  if (!socketOpen()) return;
  const fps = Math.min(120, Math.max(1, shownAt.length || 30));
  socket.send(JSON.stringify(recording ? { type: "record", on: false } : { type: "record", on: true, fps }));
});
start();

// The live window's keys: m method, 0-9 explain class k, a predicted class, h HUD, s snapshot, r record.
document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "SELECT" || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  const method = $("method"), klass = $("class");
  if (key === "m" && method.options.length) {
    method.selectedIndex = (method.selectedIndex + 1) % method.options.length;
  } else if (key >= "0" && key <= "9" && Number(key) < labels.length) {
    klass.value = key;
  } else if (key === "a") {
    klass.value = "";
  } else if (key === "h") {
    $("hud").checked = !$("hud").checked;
  } else if (key === "s") {  // a held key repeats: one snapshot, one toggle, per press
    if (!event.repeat) $("snapshot").click(); return;
  } else if (key === "r") {
    if (!event.repeat) $("record").click(); return;
  } else {
    return;
  }
  sendControls();
});
