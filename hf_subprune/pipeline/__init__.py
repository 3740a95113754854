"""The block pipeline: capture each block's inputs, gather every site's statistics, choose widths (the budget),
select and cut, and move the hidden-state stream on to the next block. Reads adapters, calls the maths."""
