"""VT.ai: a Chainlit chat that meters every token (README.md)."""

import os

# LiteLLM reads this when it is first imported: its price map from the installed package, never
# fetched from the network. Set here, before any module of the package can import LiteLLM.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
