// avatarcast page: one WebRTC call to the server. The microphone (or an audio file played through
// WebAudio) goes up as the mic track; the avatar's video and the audio it speaks come back.
// Signaling is one POST /offer after ICE gathering completes (the server does not trickle).
// A two-face avatar can hold a dialogue: the caller drives the left face, and the right face is driven by
// an audio file of the server's media folder (GET /media) or by the right channel of a stereo microphone.
"use strict";

const $ = (id) => document.getElementById(id);

const call = {
  config: null,
  pc: null,
  sessionId: null,
  micTrack: null,
  micStream: null,
  audioCtx: null,
  framesRendered: 0,
  stats: {},
  status: "idle",
  timers: [],
};
// read by the browser test (and handy in the console)
window.avatarcast = call;

function setStatus(status, message = "", isError = false) {
  call.status = status;
  const pill = $("status");
  pill.dataset.state = status;
  pill.textContent = status;
  const msg = $("message");
  msg.textContent = message;
  msg.classList.toggle("error", isError);
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function voices() {
  const faces = call.config.faces[$("avatar-select").value] || 1;
  return faces >= 2 ? document.querySelector('input[name="voices"]:checked').value : "one";
}

// the dialogue choices show only for an avatar with two faces; the file list is the server's own
async function fillDialogue() {
  const faces = call.config.faces[$("avatar-select").value] || 1;
  $("dialogue").hidden = faces < 2;
  document.querySelector(".frame").classList.toggle("wide", faces >= 2);
  $("voice-row").hidden = voices() !== "file";
  if (voices() !== "file" || call.media) return;
  try {
    call.media = (await (await fetch("/media")).json()).files;
  } catch (err) {
    call.media = [];
  }
  $("voice-select").replaceChildren(...call.media.map((f) => new Option(f, f)));
  $("voice-hint").textContent = call.media.length ? "plays once the call connects"
    : "the server has no media files (AVATARCAST_MEDIA_DIR)";
}

// the fields /offer takes for a two-person call (none for one voice)
function dialogueFields() {
  const v = voices();
  if (v === "file") {
    if (!$("voice-select").value) throw new Error("choose the second voice's file");
    return { speakers: 2, second_voice: $("voice-select").value };
  }
  return v === "stereo" ? { speakers: 2, stereo_split: true } : {};
}

// browsers send mono Opus unless the offer says the microphone is stereo
function announceStereo(sdp) {
  const m = sdp.match(/a=rtpmap:(\d+) opus\/48000\/2/i);
  if (!m) return sdp;
  const fmtp = new RegExp(`a=fmtp:${m[1]} (.*)`);
  return fmtp.test(sdp) ? sdp.replace(fmtp, (line, params) => `a=fmtp:${m[1]} ${params};stereo=1;sprop-stereo=1`)
    : sdp.replace(m[0], `${m[0]}\r\na=fmtp:${m[1]} stereo=1;sprop-stereo=1`);
}

async function loadConfig() {
  const res = await fetch("/config");
  call.config = await res.json();
  const cfg = call.config;
  const avatarSel = $("avatar-select");
  avatarSel.replaceChildren(...Object.keys(cfg.avatars).map((name) => new Option(name, name)));
  avatarSel.value = cfg.default_avatar;
  fillEmotions();
  fillDialogue();
  $("codec-select").replaceChildren(...cfg.codecs.map((c) => new Option(c.toUpperCase(), c)));
  $("codec-select").value = cfg.default_codec;
  $("file-hint").textContent = `up to ${(cfg.upload_limit_bytes / 1048576).toFixed(0)} MB; it plays as your mic`;
}

// e.g. a photo given to the drawn-face demo model: the server measured it and says why it will smear
function showAvatarWarning() {
  const warning = (call.config.avatar_warnings || {})[$("avatar-select").value] || "";
  $("avatar-warning").textContent = warning;
  $("avatar-warning").hidden = !warning;
}

function fillEmotions() {
  showAvatarWarning();
  const emotions = call.config.avatars[$("avatar-select").value] || [];
  const sel = $("emotion-select");
  sel.replaceChildren(new Option("(none)", ""), ...emotions.map((e) => new Option(e, e)));
  sel.disabled = emotions.length === 0;
}

// ---- the mic track: the microphone, or a file played through WebAudio -------------------------------
async function voiceTrack() {
  const stereo = voices() === "stereo"; // processing would mix the channels down
  call.micStream = await navigator.mediaDevices.getUserMedia({
    audio: stereo ? { channelCount: 2, echoCancellation: false, noiseSuppression: false, autoGainControl: false }
      : { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    video: false,
  });
  const track = call.micStream.getAudioTracks()[0];
  if (stereo && (track.getSettings().channelCount || 1) < 2) {
    throw new Error("this microphone is mono: a split needs a stereo input, or choose a server file as the second voice");
  }
  return track;
}

async function fileTrack() {
  const file = $("file-input").files[0];
  if (!file) throw new Error("choose an audio file first");
  const limit = call.config.upload_limit_bytes;
  if (file.size > limit) {
    throw new Error(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${(limit / 1048576).toFixed(0)} MB`);
  }
  call.audioCtx = call.audioCtx || new AudioContext({ sampleRate: 48000 });
  await call.audioCtx.resume();
  let buffer;
  try {
    buffer = await call.audioCtx.decodeAudioData(await file.arrayBuffer());
  } catch (err) {
    throw new Error(`cannot decode ${file.name} as audio`);
  }
  const dest = call.audioCtx.createMediaStreamDestination();
  const source = call.audioCtx.createBufferSource();
  source.buffer = buffer;
  source.connect(dest);
  source.start();
  source.onended = () => { if (call.pc) $("message").textContent = `${file.name} finished; the avatar idles`; };
  return dest.stream.getAudioTracks()[0];
}

function inputTrack() {
  return mode() === "file" ? fileTrack() : voiceTrack();
}

// ---- the call ------------------------------------------------------------------------------------------
function gatheringComplete(pc, timeoutMs = 5000) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs); // send what we have
  });
}

async function startCall() {
  $("call").disabled = true;
  setStatus("connecting", "asking for the microphone…");
  try {
    const dialogue = dialogueFields();
    call.micTrack = await inputTrack();
    const pc = new RTCPeerConnection({ iceServers: call.config.ice_servers });
    call.pc = pc;
    pc.addTransceiver(call.micTrack, { direction: "sendrecv" });
    pc.addTransceiver("video", { direction: "recvonly" });
    const remote = new MediaStream();
    pc.ontrack = (ev) => {
      remote.addTrack(ev.track);
      const video = $("avatar");
      if (video.srcObject !== remote) video.srcObject = remote;
      video.play().catch(() => {});
    };
    pc.onconnectionstatechange = async () => {
      const s = pc.connectionState;
      if (s === "connected") setStatus("live", "connected: talk to the avatar");
      else if (s === "failed" && !(await endedByServer())) {
        setStatus("error", "the connection failed", true);
        hangUp(false);
      } else if (s === "disconnected" || s === "closed") endedByServer();
    };
    setStatus("connecting", "connecting…");
    const offer = await pc.createOffer();
    if (dialogue.stereo_split) offer.sdp = announceStereo(offer.sdp);
    await pc.setLocalDescription(offer);
    await gatheringComplete(pc);
    const res = await fetch("/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        sdp: pc.localDescription.sdp, type: "offer", mode: mode(),
        avatar: $("avatar-select").value, emotion: $("emotion-select").value || null,
        codec: $("codec-select").value, ...dialogue,
      }),
    });
    const answer = await res.json();
    if (!res.ok) throw new Error(answer.message || `the server answered ${res.status}`);
    call.sessionId = answer.session_id;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    $("hangup").disabled = false;
    watchFrames();
    call.timers.push(setInterval(updateStats, 1000));
  } catch (err) {
    setStatus("error", err.message || String(err), true);
    await hangUp(false);
  }
}

async function hangUp(sayBye = true) {
  const { pc, sessionId } = call;
  call.timers.forEach(clearInterval);
  call.timers = [];
  if (sayBye && sessionId) {
    fetch(`/sessions/${sessionId}/bye`, { method: "POST" }).catch(() => {});
  }
  if (pc) pc.close();
  if (call.micStream) call.micStream.getTracks().forEach((t) => t.stop());
  if (call.micTrack) call.micTrack.stop();
  if (call.audioCtx) { call.audioCtx.close(); call.audioCtx = null; }
  Object.assign(call, { pc: null, sessionId: null, micTrack: null, micStream: null });
  $("avatar").srcObject = null;
  document.querySelector(".frame").classList.remove("playing");
  $("call").disabled = false;
  $("hangup").disabled = true;
  if (call.status !== "error") setStatus("idle", "call ended");
}

// the server ended the call (its avatar worker stopped, an operator, a timeout): GET /sessions/{id}
// answers 410 with why, and the page says it
async function endedByServer(res = null) {
  if (!call.sessionId) return false;
  try {
    res = res || (await fetch(`/sessions/${call.sessionId}`));
    if (res.status !== 410) return false;
    const body = await res.json();
    setStatus("error", body.message || "the server ended the call", true);
    await hangUp(false);
    return true;
  } catch (err) {
    return false;
  }
}

// a new mode during a call swaps the mic track in place (no renegotiation)
async function switchInput() {
  $("file-row").hidden = mode() !== "file";
  if (!call.pc) return;
  try {
    const old = call.micTrack;
    const track = await inputTrack();
    const sender = call.pc.getSenders().find((s) => s.track === old);
    await sender.replaceTrack(track);
    if (old) old.stop();
    call.micTrack = track;
  } catch (err) {
    $("message").textContent = err.message || String(err);
  }
}

async function changeEmotion() {
  if (!call.sessionId) return;
  const res = await fetch(`/sessions/${call.sessionId}/conditions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ avatar: $("avatar-select").value, emotion: $("emotion-select").value || null }),
  });
  const body = await res.json();
  $("message").textContent = res.ok ? `${body.emotion || "no emotion"}: applies ${body.applies}` : body.message;
}

// ---- stats -------------------------------------------------------------------------------------------
function watchFrames() {
  const video = $("avatar");
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return; // getStats still counts frames
  const onFrame = () => {
    call.framesRendered += 1;
    document.querySelector(".frame").classList.add("playing");
    if (call.pc) video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

async function updateStats() {
  const pc = call.pc;
  if (!pc) return;
  const report = await pc.getStats();
  const s = {};
  const codecs = {};
  report.forEach((r) => { if (r.type === "codec") codecs[r.id] = r.mimeType; });
  report.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") {
      s.fps = r.framesPerSecond;
      s.framesDecoded = r.framesDecoded;
      s.codec = codecs[r.codecId];
      if (r.jitterBufferEmittedCount) s.jitterMs = (1000 * r.jitterBufferDelay) / r.jitterBufferEmittedCount;
    }
    if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded" && r.currentRoundTripTime !== undefined) {
      s.rttMs = 1000 * r.currentRoundTripTime;
    }
  });
  if (call.sessionId && (!call.stats.serverAt || Date.now() - call.stats.serverAt > 2000)) {
    try {
      const res = await fetch(`/sessions/${call.sessionId}`);
      if (res.status === 410) { await endedByServer(res); return; }
      if (res.ok) s.serverMs = (await res.json()).latency_ms.p50;
      s.serverAt = Date.now();
    } catch (err) { /* stats are best effort */ }
  } else {
    s.serverMs = call.stats.serverMs;
    s.serverAt = call.stats.serverAt;
  }
  call.stats = s;
  const fmt = (v, unit = "") => (v === undefined || v === null ? "–" : `${Math.round(v)}${unit}`);
  $("stat-fps").textContent = fmt(s.fps);
  $("stat-rtt").textContent = fmt(s.rttMs, " ms");
  const total = (s.serverMs || 0) + (s.rttMs || 0) / 2 + (s.jitterMs || 0);
  $("stat-latency").textContent = total ? fmt(total, " ms") : "–";
  $("stat-codec").textContent = s.codec ? s.codec.split("/")[1] : "–";
  $("stat-frames").textContent = String(call.framesRendered || s.framesDecoded || 0);
}

// ---- wiring ------------------------------------------------------------------------------------------
window.addEventListener("DOMContentLoaded", async () => {
  try {
    await loadConfig();
  } catch (err) {
    setStatus("error", "cannot reach the server", true);
    return;
  }
  $("call").addEventListener("click", startCall);
  $("hangup").addEventListener("click", () => hangUp(true));
  $("avatar-select").addEventListener("change", () => { fillEmotions(); fillDialogue(); changeEmotion(); });
  document.querySelectorAll('input[name="voices"]').forEach((r) => r.addEventListener("change", fillDialogue));
  $("emotion-select").addEventListener("change", changeEmotion);
  document.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", switchInput));
  $("file-input").addEventListener("change", () => { if (call.pc && mode() === "file") switchInput(); });
  window.addEventListener("pagehide", () => {
    if (call.sessionId) navigator.sendBeacon(`/sessions/${call.sessionId}/bye`);
  });
  call.ready = true;
});
