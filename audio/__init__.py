"""Audio front end: numpy in, numpy out, CPU (torch only inside the learned encoders, imported lazily).

pcm        16 kHz / 25 fps conventions, sample conversion and validation
buffer     PcmBuffer: bounded mono PCM addressed by absolute sample index; OverflowPolicy
resample   StreamResampler: any rate / channels / layout -> 16 kHz mono float32 (soxr)
io         read_audio: any file soundfile or PyAV decodes -> 16 kHz mono; AudioReadError
features   MelFeatures, Wav2Vec2Features, WhisperFeatures: per-video-frame features, offline + streaming
align      video frames -> latent frames (Audio Pack and FAA layouts)
vad        energy VAD per 20 ms frame
"""
