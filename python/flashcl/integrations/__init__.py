"""Drop-ins and one-call patches for where users train, each in its own module, imported only when used:

    flashcl.integrations.sentence_transformers   MultipleNegativesRankingLoss, GISTEmbedLoss and friends; apply_flashcl_to_sentence_transformers()
    flashcl.integrations.transformers            apply_flashcl_to_clip(), apply_flashcl_to_siglip(), ...
    flashcl.integrations.open_clip               apply_flashcl_to_open_clip() (open_clip_train), CoCaLoss
"""
