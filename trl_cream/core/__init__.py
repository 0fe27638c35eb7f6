"""The algorithm as pure functions: implicit rewards, consistency measures, round labelling and the loss."""
