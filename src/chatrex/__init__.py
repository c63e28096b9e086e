"""chatrex: ChatRex (UPN proposals + a grounded multimodal LLM) as installable, pure-PyTorch software.

`import chatrex` stays fast: heavy modules (torch models, transformers) load only when their
sub-package is imported (`chatrex.upn`, `chatrex.model`, ...).
"""

__version__ = "0.1.0"
