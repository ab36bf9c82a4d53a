"""Analysis callbacks for edit streams: each observes the model (never changes a weight), logs scalars
against the edit index and draws one figure at the end of the stream (TensorBoard + PNG in the run folder)."""

from callbacks.cross_modal import CrossModalStatistics
from callbacks.edit_cost import EditCost
from callbacks.general_capability import GeneralCapability
from callbacks.interference import Interference
from callbacks.representation_shift import RepresentationShift

__all__ = ["CrossModalStatistics", "EditCost", "GeneralCapability", "Interference", "RepresentationShift"]
