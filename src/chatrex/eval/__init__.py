"""Evaluation apps: UPN proposals (``chatrex.eval.upn_eval``), ChatRex tasks
(``chatrex.eval.chatrex_eval``) and shared COCO metrics (``chatrex.eval.coco_eval``).

Nothing is imported here so ``import chatrex.eval`` stays cheap; import the submodules directly.
"""
