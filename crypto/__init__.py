"""Privacy mechanisms: keys, signatures, fixed-point encoding, HE and secure aggregation.

Pure numpy, tenseal and cryptography: nothing here imports Flower or torch. This release runs
in ``privacy=plain`` only, so the package is empty; the secure-sum backends land here.
"""
