"""NEUCORE, compir's stage-2 concept-reasoning re-ranker: the scorer (``model``), its weakly
supervised training on a frozen checkpoint (``train``), and what stage-2 methods share (``stage2``:
the sidecar file, split encoding, re-ranked evaluation)."""
