// Copies the microphone's samples (the AudioContext's rate, 16 kHz here) to the page, one render
// quantum at a time; the page frames and encodes them.
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel && channel.length) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("capture", Capture);
