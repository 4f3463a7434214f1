"""The model room: ViT + BERT dual tower, fusion layers, captioning decoder, and the
model-directory format. See docs/architecture.md ("Model") for the contract."""
from vlp.model.io import (MODEL_FILES, add_decoder_token, build_model, load_model_dir,
                          model_dir_fingerprint, portable_config, save_model_dir)
from vlp.model.text import DEC_TOKEN
from vlp.model.vlp_model import VLPModel

__all__ = ["DEC_TOKEN", "MODEL_FILES", "VLPModel", "add_decoder_token", "build_model",
           "load_model_dir", "model_dir_fingerprint", "portable_config", "save_model_dir"]
