"""Training and building on several processes: the process group and collectives (:mod:`.group`), the policy as
DDP or FSDP2 wraps it (:mod:`.policy`), FSDP2's units (:mod:`.fsdp2`) and sharded weights on disk
(:mod:`.sharded_io`)."""
