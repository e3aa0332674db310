"""The defaults every command and function shares, stated once.

Lengths count tokens with EOS. The evaluation lengths are T0's and the paper's evaluation
settings (inputs truncated at 512 tokens, answers and generations at 128); training's input
length is the paper's most common prompt-expert source length (256; some experts use 512, see
`tasks/inventory.py`). The batch size is that of scoring and evaluation passes.
"""

MAX_INPUT_LENGTH = 512       # evaluation and scoring: input tokens, EOS included
MAX_TARGET_LENGTH = 128      # answer choices and generated text, EOS included
TRAIN_INPUT_LENGTH = 256     # training inputs (the paper's prompt experts: 256 or 512)
TRAIN_TARGET_LENGTH = 128    # training targets (the paper: 128; continual experts 256)
BATCH_SIZE = 32              # examples per scoring / evaluation batch
MAX_EXAMPLES = 1000          # examples per evaluated task unless asked otherwise
SEED = 42                    # the paper's seed: adapter draws, key samples, shuffles
