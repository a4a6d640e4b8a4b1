"""Around the two sides: the v2.4 log writer and its analyzer, the bench, ring cleanup and the
helpers that start a daemon as a child process."""
