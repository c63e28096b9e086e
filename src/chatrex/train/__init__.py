"""Training apps: the UPN trainer (``chatrex.train.upn_trainer``) and the ChatRex trainer
(``chatrex.train.chatrex_trainer``), sharing ``chatrex.train.common`` (seeding, progress bar,
exact checkpoint/resume, bf16 autocast, JSON configs, LR schedules).

Nothing is imported here so ``import chatrex.train`` stays cheap; import the submodules directly.
"""
