// The microphone as 16 kHz mono float samples (the browser resamples), for the talk and voice views.
// Browsers give the microphone to secure contexts only: https, or http://localhost.

export const RATE = 16000;

export class Microphone {
  constructor(onSamples) {
    this.onSamples = onSamples;
    this.context = null;
    this.stream = null;
  }

  async open() {
    if (!window.isSecureContext || !navigator.mediaDevices) {
      throw new Error("the browser gives the microphone only to https:// pages or http://localhost (see the README)");
    }
    this.stream = await navigator.mediaDevices.getUserMedia({
      // No processing: the server hears what a device microphone would (echo cancellation reshapes speech).
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    this.context = new AudioContext({ sampleRate: RATE });
    await this.context.audioWorklet.addModule("/console/capture-worklet.js");
    const source = this.context.createMediaStreamSource(this.stream);
    const node = new AudioWorkletNode(this.context, "capture");
    node.port.onmessage = (e) => this.onSamples(e.data);
    source.connect(node);
    // A worklet runs only when its graph reaches the destination; it outputs silence.
    node.connect(this.context.destination);
    await this.context.resume();
  }

  async close() {
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    if (this.context) await this.context.close();
    this.stream = this.context = null;
  }
}

// Record `seconds` of the microphone; resolves with the samples.
export async function record(seconds, onProgress) {
  const chunks = [];
  let total = 0;
  const want = Math.round(seconds * RATE);
  let done;
  const finished = new Promise((resolve) => (done = resolve));
  const mic = new Microphone((samples) => {
    if (total >= want) return;
    chunks.push(samples);
    total += samples.length;
    if (onProgress) onProgress(Math.min(1, total / want));
    if (total >= want) done();
  });
  await mic.open();
  await finished;
  await mic.close();
  const out = new Float32Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out.subarray(0, want);
}

// 16-bit PCM WAV of mono samples: what the upload endpoints decode.
export function wav(samples, rate = RATE) {
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const v = new DataView(buffer);
  const text = (at, s) => [...s].forEach((c, i) => v.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF");
  v.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  v.setUint32(16, 16, true);
  v.setUint16(20, 1, true);
  v.setUint16(22, 1, true);
  v.setUint32(24, rate, true);
  v.setUint32(28, rate * 2, true);
  v.setUint16(32, 2, true);
  v.setUint16(34, 16, true);
  text(36, "data");
  v.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    v.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([buffer], { type: "audio/wav" });
}
