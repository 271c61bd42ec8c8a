"""Writes a trained run's model in a form that leaves this repository.

  python launch/convert.py --config=configs/audio_video_text.py --workdir=runs/avt \
      --to=jax --out=model/ [--modalities=text,audio] [--step=N]

--to=jax: per modality, its embedding function serialized with jax.export (inputs as the
evaluation pipeline prepares them, any batch size), its params as .npz and a JSON file
describing inputs, output and preprocessing (xmodal_jax/eval/embedding_fn.py); loading it
needs jax and NumPy only (docs/guide.md, "Taking the model elsewhere").

--to=hf: Hugging Face folders. A text and an image modality whose towers are CLIP's
(`clip_text`, and a `vit` with CLIP's vision options, or both from a CLIP folder) become one
folder `transformers.CLIPModel.from_pretrained` loads, with the tokenizer and the image
preprocessing; with --modalities naming other towers, each becomes {out}/{modality}/ in its
family's layout (CLIP text or vision, ViT, BERT, AST) with its head as projection.safetensors.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from common import ALLOW_CONFIG_CHANGE, CONFIG, WORKDIR, join_runtime  # launch/common.py
from xmodal_jax.eval import embedding_fn
from xmodal_jax import experiment as experiment_lib
from xmodal_jax.pretrained import run_to_hf

FORMATS = ("jax", "hf")
_TO = flags.DEFINE_enum("to", None, FORMATS,
                        "What to write: jax (jax.export functions) or hf (Hugging Face folders).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_MODALITIES = flags.DEFINE_list("modalities", None, "Modalities to convert (default: all).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.mark_flags_as_required(["to", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  join_runtime()
  experiment = experiment_lib.setup(CONFIG.value, WORKDIR.value, step=_STEP.value,
                                    require_checkpoint=True,
                                    allow_config_change=ALLOW_CONFIG_CHANGE.value)
  config = experiment.config
  modalities = _MODALITIES.value or list(config.modalities)
  unknown = sorted(set(modalities) - set(config.modalities))
  if unknown:
    raise app.UsageError(f"--modalities: {unknown} are not the run's; it has "
                         f"{sorted(config.modalities)}")
  example = experiment.source.abstract_batch(2)
  params = jax.device_get(experiment.state.params)
  if jax.process_index() != 0:
    return
  if _TO.value == "hf":
    try:
      for line in run_to_hf.write_run(experiment.model, params, config.modalities, modalities,
                                  _OUT.value):
        print(line)
    except ValueError as e:  # a tower without a Hugging Face layout: the message says which
      raise app.UsageError(str(e)) from e
    return
  for modality in modalities:
    options = json.loads(config.modalities[modality].to_json_best_effort())
    described = embedding_fn.export_modality(experiment.model, params, modality,
                                             example[modality], options, _OUT.value)
    print(f"{modality}: {described['params']} param arrays, inputs "
          f"{ {k: v['shape'] for k, v in described['inputs'].items()} } -> "
          f"{_OUT.value}/{modality}.jax_export")


if __name__ == "__main__":
  app.run(main)
