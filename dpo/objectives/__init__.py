"""What training optimises: the objectives and their checks as TRL 1.16 makes them (:mod:`.objective`, no torch),
and the losses as small pure functions over typed inputs: DPO's (:mod:`.pair_losses`, fed by :mod:`.pair_inputs`),
the unpaired ones (:mod:`.unpaired_losses`) and distillation's divergences and TDPO (:mod:`.distill`)."""
