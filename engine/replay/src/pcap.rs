//! Reading and writing the classic pcap files of the replay (Ethernet, microsecond timestamps,
//! little-endian, so a file written here is byte-identical on every machine).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::Duration;

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::{DataLink, Endianness, TsResolution};

/// One captured frame: when it was seen (since the Unix epoch) and its bytes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Frame {
    pub ts: Duration,
    pub data: Vec<u8>,
}

#[derive(thiserror::Error, Debug)]
pub enum PcapError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: {why}")]
    Format { path: String, why: String },
}

/// The header of every pcap this module writes.
pub fn header() -> PcapHeader {
    PcapHeader {
        version_major: 2,
        version_minor: 4,
        ts_correction: 0,
        ts_accuracy: 0,
        snaplen: 65535,
        datalink: DataLink::ETHERNET,
        ts_resolution: TsResolution::MicroSecond,
        endianness: Endianness::Little,
    }
}

/// Reads every frame of a pcap stream (either byte order, micro- or nanosecond stamps).
pub fn read_from(r: impl Read, path: &str) -> Result<Vec<Frame>, PcapError> {
    let fmt = |e: pcap_file::PcapError| PcapError::Format {
        path: path.to_owned(),
        why: e.to_string(),
    };
    let mut reader = PcapReader::new(r).map_err(fmt)?;
    if reader.header().datalink != DataLink::ETHERNET {
        return Err(PcapError::Format {
            path: path.to_owned(),
            why: format!("link type {:?}, not Ethernet", reader.header().datalink),
        });
    }
    let mut frames = Vec::new();
    while let Some(p) = reader.next_packet() {
        let p = p.map_err(fmt)?;
        frames.push(Frame {
            ts: p.timestamp,
            data: p.data.into_owned(),
        });
    }
    Ok(frames)
}

pub fn read(path: &Path) -> Result<Vec<Frame>, PcapError> {
    let name = path.display().to_string();
    let f = File::open(path).map_err(|error| PcapError::Io {
        path: name.clone(),
        error,
    })?;
    read_from(BufReader::new(f), &name)
}

/// A pcap being written frame by frame (the recorder's and the generator's).
pub struct Writer<W: Write> {
    inner: PcapWriter<W>,
}

impl<W: Write> Writer<W> {
    pub fn new(w: W) -> Result<Writer<W>, pcap_file::PcapError> {
        Ok(Writer {
            inner: PcapWriter::with_header(w, header())?,
        })
    }

    pub fn write(&mut self, ts: Duration, data: &[u8]) -> Result<(), pcap_file::PcapError> {
        // Microsecond files: stamps are cut to whole microseconds, as the reader will see them.
        let ts = Duration::from_micros(ts.as_micros() as u64);
        self.inner
            .write_packet(&PcapPacket::new(ts, data.len() as u32, data))?;
        Ok(())
    }

    pub fn into_inner(self) -> W {
        self.inner.into_writer()
    }
}

/// The bytes of a pcap holding `frames`.
pub fn to_bytes(frames: &[Frame]) -> Vec<u8> {
    let mut w = Writer::new(Vec::new()).expect("writing to memory");
    for f in frames {
        w.write(f.ts, &f.data).expect("writing to memory");
    }
    w.into_inner()
}

pub fn write(path: &Path, frames: &[Frame]) -> Result<(), PcapError> {
    let io = |error| PcapError::Io {
        path: path.display().to_string(),
        error,
    };
    let mut f = BufWriter::new(File::create(path).map_err(io)?);
    f.write_all(&to_bytes(frames)).map_err(io)?;
    f.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_files() {
        let frames = vec![
            Frame {
                ts: Duration::from_micros(1_700_000_000_000_001),
                data: vec![1, 2, 3],
            },
            Frame {
                ts: Duration::from_micros(1_700_000_000_500_000),
                data: vec![0; 1514],
            },
        ];
        let bytes = to_bytes(&frames);
        assert_eq!(&bytes[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(read_from(&bytes[..], "mem").unwrap(), frames);
        assert!(read_from(&bytes[..10], "mem").is_err());
        assert!(read_from(&bytes[..bytes.len() - 1], "mem").is_err());
        assert!(read_from(&b"not a pcap file at all.."[..], "mem").is_err());
    }
}
