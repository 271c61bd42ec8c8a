"""Each supported family's converters, one module per family: config.json -> our tower,
and its tensors -> the tower's params. CONVERTERS is the table `hf.convert` dispatches
on; `to_hf` runs the same converters to write folders back out."""

import numpy as np

from xmodal_jax.pretrained.families import bert, clip, siglip, vit, wav2vec2, whisper


def token_example(tower):
  del tower
  return {"input_ids": np.zeros((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32)}


def pixel_example(tower):
  return {"pixels": np.zeros((1,) + tower.input_size() + (tower.num_channels,), np.float32)}


# model_type -> (tower(config, overrides, path, weights), params(weights, tower), an example
# input for the tower's init).
CONVERTERS = {
    **{family: (lambda c, o, p, w, family=family: bert.bert_tower(c, family, o),
                bert.bert_params, token_example) for family in ("bert", "roberta", "xlm-roberta")},
    "clip_text_model": (lambda c, o, p, w: clip.clip_text_tower(c, o), clip.clip_text_params,
                        token_example),
    "clip_vision_model": (lambda c, o, p, w: clip.clip_vision_tower(c, o),
                          clip.clip_vision_params, pixel_example),
    "siglip_text_model": (lambda c, o, p, w: siglip.siglip_text_tower(c, o),
                          siglip.siglip_text_params, token_example),
    "siglip_vision_model": (lambda c, o, p, w: siglip.siglip_vision_tower(c, o),
                            siglip.siglip_vision_params, pixel_example),
    "vit": (lambda c, o, p, w: vit.vit_tower(c, o, w), vit.vit_params, pixel_example),
    "audio-spectrogram-transformer": (
        lambda c, o, p, w: vit.ast_tower(c, o, p), vit.ast_params,
        lambda t: {"spectrogram": np.zeros((1, t.max_frames, t.num_mels), np.float32)}),
    **{family: (lambda c, o, p, w: wav2vec2.speech_tower(c, o, p), wav2vec2.speech_params,
                lambda t: {"waveform": np.zeros((1, t.sample_rate), np.float32)})
       for family in wav2vec2.SPEECH_FAMILIES},
    "whisper": (lambda c, o, p, w: whisper.whisper_tower(c, o), whisper.whisper_params,
                lambda t: {"spectrogram": np.zeros((1, 2 * t.max_positions, t.num_mels),
                                                   np.float32)}),
}
