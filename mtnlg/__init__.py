"""mtnlg: Megatron-Turing NLG style GPT training, evaluation, export and serving.

``mtnlg.from_pretrained(path)`` loads a run directory or a Hugging Face GPT-2
directory as a :class:`mtnlg.api.LanguageModel` (imported lazily, so
``import mtnlg`` stays cheap for the CLI)."""


def __getattr__(name):
    if name in ("from_pretrained", "LanguageModel"):
        from mtnlg import api
        return getattr(api, name)
    raise AttributeError(f"module 'mtnlg' has no attribute {name!r}")


__all__ = ["from_pretrained", "LanguageModel"]
