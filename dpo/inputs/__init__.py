"""Data in: reading records in the formats TRL accepts (:mod:`.records`), each kind's examples (:mod:`.pairs`,
:mod:`.unpaired`, :mod:`.completions`) and their tokenization as TRL 1.16 does it (:mod:`.tokenization`). No torch."""
