"""The fixed questions self-verification asks the model (torch-free, so the shapes world can train on them)."""

VERIFY_QUESTION = "Does this image align with the prompt: {prompt}?"  # answered yes/no
CAPTION_QUESTION = "Describe this image."  # answered with a caption; scores the prompt's likelihood
