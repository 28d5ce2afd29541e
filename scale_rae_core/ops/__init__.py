"""Operations tooling for the machines srae runs on (``srae tpu clear``); nothing in the engine imports it."""
