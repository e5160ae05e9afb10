"""Data sets, read once and hashed: text (named corpora and files, sliced), labelled image
folders, FASTA files and their masking plans. Scoring, training, tasks and search read their
data from here; nothing here knows about models or scores."""
from arfuse.data.fasta import FastaRecord, MaskConfig, ProteinDataset, load_protein_dataset, mask_positions, read_fasta
from arfuse.data.images import ImageDataset, is_image_data, load_image_dataset
from arfuse.data.text import NAMED, Dataset, load_dataset

__all__ = ["Dataset", "load_dataset", "NAMED", "ImageDataset", "load_image_dataset", "is_image_data",
           "FastaRecord", "ProteinDataset", "load_protein_dataset", "read_fasta", "MaskConfig", "mask_positions"]
