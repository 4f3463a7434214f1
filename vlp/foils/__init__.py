"""The foils room: does the model pick the true caption over captions with the same words
and another meaning (and the true image over look-alikes)? Reads the community's formats
(SugarCrepe, ARO, Winoground, vlp's own), scores with every head the model has, reports
per scorer and per type. See docs/foils.md."""
from vlp.foils.formats import FoilItem, FoilSet, FoilsError, read_foils
from vlp.foils.run import FoilOptions, evaluate_foils, run, training_foils
from vlp.foils.score import SCORERS, scorers_of

__all__ = ["FoilItem", "FoilOptions", "FoilSet", "FoilsError", "SCORERS", "evaluate_foils",
           "read_foils", "run", "scorers_of", "training_foils"]
