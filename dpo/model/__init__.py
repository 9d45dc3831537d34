"""A causal LM as both passes use it: loading and fingerprinting (:mod:`.loading`), per-token log-probs
(:mod:`.scoring`) through the LM head slice by slice (:mod:`.head`), and teacher divergences at the scored positions
(:mod:`.teacher_records`)."""
