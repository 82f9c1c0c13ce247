//! Writes one SSTable from records in ascending internal-key order (format in
//! `docs/sstable-format.md`). The file is fsynced before `finish` returns; it becomes visible
//! to readers only when the manifest lists it.

use std::path::{Path, PathBuf};

use crate::engine::error::{EngineError, Result};
use crate::engine::types::Record;
use crate::engine::vfs::{BufferedWriter, Vfs};

use super::block::{TableFormat, encode_entry};
use super::bloom::{Bloom, key_hash};
use super::{FOOTER_LEN, MAGIC, TableMeta};

/// The size of a table's write buffer, so of each write. With `direct_table_writes`
/// (`EngineOptions`) a table is written with direct I/O where the file system allows it
/// ([`Vfs::create_direct`]), each write on the device before the next: a flush or
/// compaction output then never fills the page cache with dirty and writeback pages. Under a
/// memory limit those were what reclaim found and waited on (up to 100 ms at a time) in every
/// thread that needed a page, a writer appending to the commit log among them
/// (docs/benchmarks.md, round 3, steps 10 and 11). The table's blocks enter the page cache
/// when its mapping is read, clean, and so from the device: a just-written table is cold.
const WRITE_BUFFER: usize = 1 << 20;

/// Where tables are written through the page cache, their bytes are handed to writeback every
/// this many bytes as they are written, each time after the previous step's writeback finished, so a
/// 64 MiB flush or compaction output reaches the device steadily, at most about two steps in
/// flight, instead of in one burst at its fsync or in a deep queue, where every commit-log
/// fsync of the node would wait behind it.
const WRITE_BEHIND: u64 = 1 << 20;

/// The unit data blocks are aligned to: a memory page, what a point read through the table's
/// mapping (advised random) faults in with one read of the device.
const PAGE: usize = 4096;

/// The most padding after a data block (1/16 of a page), so padding never costs more than that
/// share of a table whatever the size of its entries. A block ends on a page boundary (the next
/// block then starts on a page) when that costs at most this many zeros; otherwise it ends
/// where its last entry ends and the next block starts inside that page.
const MAX_PADDING: usize = PAGE / 16;

/// What pads a data block to its page.
const ZEROS: [u8; PAGE] = [0; PAGE];

/// The bytes a block's CRC adds to its payload.
const CRC_LEN: usize = 4;

pub struct TableBuilder {
    path: PathBuf,
    out: BufferedWriter,
    offset: u64,
    block_bytes: usize,
    /// Whether data blocks are laid out on pages (`block_bytes` a multiple of [`PAGE`]): a block
    /// of small entries starts on a page and ends on one, so a point read that misses the page
    /// cache reads the device once, not twice for a block that straddles two pages; a block of
    /// large entries holds one entry ([`Self::end_on_pages`]).
    page_aligned: bool,
    format: TableFormat,
    block: Vec<u8>,
    /// The last key added to the current block (empty before its first entry).
    block_last_key: Vec<u8>,
    index: Vec<(Vec<u8>, u64, u32)>,
    hashes: Vec<u64>,
    meta: TableMeta,
}

fn io(path: &Path, e: std::io::Error) -> EngineError {
    EngineError::io(format!("write SSTable {}", path.display()), e)
}

impl TableBuilder {
    pub fn create(
        vfs: &dyn Vfs,
        path: &Path,
        id: u64,
        block_bytes: usize,
        format: TableFormat,
        direct: bool,
    ) -> Result<Self> {
        // Exclusive: ids are never reused, and a table file may be a hard link shared with a
        // snapshot, which truncating an existing name would destroy.
        let file = if direct {
            vfs.create_direct(path)
        } else {
            vfs.create(path, true)
        }
        .map_err(|e| io(path, e))?;
        let out = BufferedWriter::new(file, WRITE_BUFFER)
            .map_err(|e| io(path, e))?
            .with_write_behind(WRITE_BEHIND);
        Ok(Self {
            path: path.to_path_buf(),
            out,
            offset: 0,
            block_bytes,
            page_aligned: block_bytes >= PAGE && block_bytes % PAGE == 0,
            format,
            block: Vec::with_capacity(block_bytes * 2),
            block_last_key: Vec::new(),
            index: Vec::new(),
            hashes: Vec::new(),
            meta: TableMeta::empty(id),
        })
    }

    /// Adds a record; keys must be strictly ascending.
    pub fn add(&mut self, ikey: &[u8], record: &Record) -> Result<()> {
        if self.meta.entries == 0 {
            self.meta.min_key = ikey.to_vec();
        }
        self.meta.max_key = ikey.to_vec();
        self.meta.entries += 1;
        self.meta.tombstones += u64::from(record.is_tombstone());
        self.meta.min_hash = self.meta.min_hash.min(record.ring_hash);
        self.meta.max_hash = self.meta.max_hash.max(record.ring_hash);
        self.hashes.push(key_hash(ikey));
        let before = self.block.len();
        encode_entry(
            self.format,
            &self.block_last_key,
            ikey,
            record,
            &mut self.block,
        );
        if self.page_aligned {
            return self.end_on_pages(before, ikey, record);
        }
        self.set_last_key(ikey);
        if self.block.len() >= self.block_bytes {
            self.finish_block()?;
        }
        Ok(())
    }

    fn set_last_key(&mut self, ikey: &[u8]) {
        self.block_last_key.clear();
        self.block_last_key.extend_from_slice(ikey);
    }

    /// The page boundary (a file offset) the current block should end at: `block_bytes` past a
    /// block that starts on a page; for one that starts inside a page (after a block of large
    /// entries that was not padded), the end of that page and `block_bytes - PAGE` more, so the
    /// blocks after it are back on pages.
    fn block_target(&self) -> u64 {
        let page = PAGE as u64;
        (self.offset / page + 1) * page + (self.block_bytes - PAGE) as u64
    }

    /// Where the current block would end (with its CRC) if it held `len` bytes of entries.
    fn block_end(&self, len: usize) -> u64 {
        self.offset + (len + CRC_LEN) as u64
    }

    /// Ends the block where the entry just encoded (the block was `before` bytes long) took
    /// it past its target page boundary: before the entry (padded to that boundary) when at
    /// most [`MAX_PADDING`] bytes are left, the entry then starting the next block; otherwise
    /// after it. So a block holds at most `block_bytes` and a page before its last entry, and
    /// an entry larger than a block is a block of its own: a point read checks the CRC of and
    /// decodes about a block's worth of bytes, never megabytes (it grew into page after page
    /// while the room left stayed large, which entries a little over a page long, 8 KiB values,
    /// do for about a hundred entries: docs/benchmarks.md, "Streaming").
    fn end_on_pages(&mut self, before: usize, ikey: &[u8], record: &Record) -> Result<()> {
        let target = self.block_target();
        if self.block_end(self.block.len()) <= target {
            self.set_last_key(ikey);
            return Ok(());
        }
        let room = target.saturating_sub(self.block_end(before));
        if before == 0 || room > MAX_PADDING as u64 {
            self.set_last_key(ikey);
            return self.finish_block();
        }
        self.block.truncate(before);
        self.finish_block()?;
        // The entry starts the next block, alone: it fits there or is a block of its own.
        encode_entry(self.format, &[], ikey, record, &mut self.block);
        self.end_on_pages(0, ikey, record)
    }

    /// Bytes written so far (for splitting outputs by size).
    pub fn estimated_size(&self) -> u64 {
        self.offset + self.block.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.meta.entries == 0
    }

    fn write_block(&mut self, payload: &[u8]) -> Result<(u64, u32)> {
        let crc = crc32c::crc32c(payload);
        let start = self.offset;
        self.out
            .write_all(payload)
            .and_then(|()| self.out.write_all(&crc.to_le_bytes()))
            .map_err(|e| io(&self.path, e))?;
        let len = payload.len() as u64 + 4;
        self.offset += len;
        Ok((start, len as u32))
    }

    /// Zeros up to the next page boundary when at most [`MAX_PADDING`] are needed (readers find
    /// blocks through the index only, so no block covers them).
    fn pad_to_page(&mut self) -> Result<()> {
        let misalignment = (self.offset % PAGE as u64) as usize;
        if misalignment == 0 || PAGE - misalignment > MAX_PADDING {
            return Ok(());
        }
        let (fill, _) = ZEROS.split_at(PAGE - misalignment);
        self.out.write_all(fill).map_err(|e| io(&self.path, e))?;
        self.offset += fill.len() as u64;
        Ok(())
    }

    /// Writes the current block to the file and its last key to the index; on pages, pads
    /// after it when that is cheap ([`Self::pad_to_page`]).
    fn finish_block(&mut self) -> Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::take(&mut self.block);
        let (offset, len) = self.write_block(&block)?;
        self.block = block;
        self.block.clear();
        self.index
            .push((std::mem::take(&mut self.block_last_key), offset, len));
        if self.page_aligned {
            self.pad_to_page()?;
        }
        Ok(())
    }

    /// Writes bloom, index, meta and footer, fsyncs, and returns the table's metadata.
    pub fn finish(mut self) -> Result<TableMeta> {
        self.finish_block()?;
        let mut buf = Vec::new();
        Bloom::build(&self.hashes, self.format.filter_layout()).encode(&mut buf);
        let (bloom_off, bloom_len) = self.write_block(&buf)?;

        buf.clear();
        buf.extend_from_slice(&(self.index.len() as u32).to_le_bytes());
        for (key, off, len) in &self.index {
            buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
            buf.extend_from_slice(key);
            buf.extend_from_slice(&off.to_le_bytes());
            buf.extend_from_slice(&len.to_le_bytes());
        }
        let (index_off, index_len) = self.write_block(&buf)?;

        buf.clear();
        self.meta.encode(&mut buf);
        let (meta_off, meta_len) = self.write_block(&buf)?;

        let mut footer = Vec::with_capacity(FOOTER_LEN);
        for (off, len) in [
            (index_off, index_len),
            (bloom_off, bloom_len),
            (meta_off, meta_len),
        ] {
            footer.extend_from_slice(&off.to_le_bytes());
            footer.extend_from_slice(&len.to_le_bytes());
        }
        footer.extend_from_slice(&self.format.version().to_le_bytes());
        let crc = crc32c::crc32c(&footer);
        footer.extend_from_slice(&crc.to_le_bytes());
        footer.extend_from_slice(&MAGIC.to_le_bytes());
        debug_assert_eq!(footer.len(), FOOTER_LEN);
        self.out.write_all(&footer).map_err(|e| io(&self.path, e))?;
        self.offset += footer.len() as u64;
        let file = self.out.into_file().map_err(|e| io(&self.path, e))?;
        file.sync_all().map_err(|e| io(&self.path, e))?;
        self.meta.file_bytes = self.offset;
        Ok(self.meta)
    }
}
