"""Drop-ins for other libraries' losses, each in its own module, imported only when used:

    flashcl.integrations.sentence_transformers   MultipleNegativesRankingLoss and friends
"""
