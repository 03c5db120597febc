"""Quality experiments (`recsys report`): the same data and seeds, several model variants, test
metrics as mean ± std, written as JSON and a Markdown table."""
