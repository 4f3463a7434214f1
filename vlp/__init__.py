"""vlp: vision-language pretraining (ITC, FILIP, ITM, captioning) on WebDataset shards."""
__version__ = "0.1.0"
