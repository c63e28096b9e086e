"""chatrex: ChatRex (UPN proposals + a grounded multimodal LLM) as installable, pure-PyTorch software.

`import chatrex` stays fast: heavy modules (torch models, transformers) load only when their
sub-package is imported (`chatrex.upn`, `chatrex.model`, ...).
"""

__version__ = "0.1.0"


def _register_with_transformers_if_loaded() -> None:
    # The seed's scripts import transformers, then chatrex.*, then load a ChatRex folder through
    # AutoProcessor / AutoModelForCausalLM (with trust_remote_code set). Registering our native classes
    # here makes that work with no remote code. Only when transformers is already loaded, so a plain
    # `import chatrex` stays fast.
    import sys

    if "transformers" in sys.modules:
        from chatrex.model import register_auto_classes

        register_auto_classes()


_register_with_transformers_if_loaded()
