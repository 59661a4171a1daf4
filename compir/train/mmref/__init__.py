"""MMRef (Ma et al.): multi-modal references per object identity, reference-guided fine-tuning and
reference-based refinement. ``identities`` (where identities come from), ``references`` (the
reference bank on a model's features), ``finetune`` (reference-guided learning that updates the
encoders), ``train`` (``train_mmref``: all of it, and the sidecar the export takes)."""

from compir.train.mmref.identities import IDENTITY_SOURCES, IdentityAssignment, assign_identities, cluster_vectors
from compir.train.mmref.references import MODALITIES, Identities, ReferenceBank, fit_references, reference_coordinates
from compir.train.mmref.train import KIND, MMRefResult, choose_settings, refine_scores, train_mmref

__all__ = [
    "IDENTITY_SOURCES", "KIND", "MODALITIES", "IdentityAssignment", "Identities", "MMRefResult", "ReferenceBank",
    "assign_identities", "choose_settings", "cluster_vectors", "fit_references", "reference_coordinates", "refine_scores",
    "train_mmref",
]
