//! `redirect-user probe`: one TCP exchange from inside a namespace.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    time::Duration,
};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// Network namespace to connect from (e.g. /var/run/netns/NAME).
    #[arg(long)]
    pub netns: String,
    /// SO_MARK for the socket, e.g. 0x539 (the proxy mark).
    #[arg(long, value_parser = parse_u32)]
    pub mark: Option<u32>,
    /// Source address to bind (port chosen by the kernel).
    #[arg(long)]
    pub source: Option<std::net::IpAddr>,
    /// Seconds to wait for the connection and the answer.
    #[arg(long, default_value_t = 3)]
    pub timeout: u64,
    /// The line to send.
    #[arg(long, default_value = "probe")]
    pub send: String,
    /// Where to connect.
    pub addr: SocketAddr,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| e.to_string())
}

pub fn run(args: &ProbeArgs) -> Result<()> {
    println!("{}", exchange(args)?);
    Ok(())
}

pub fn exchange(args: &ProbeArgs) -> Result<String> {
    let ns = Netns::open(&args.netns)?;
    let timeout = Duration::from_secs(args.timeout);
    let sock = ns
        .run(|| -> std::io::Result<Socket> {
            let domain = if args.addr.is_ipv6() {
                Domain::IPV6
            } else {
                Domain::IPV4
            };
            let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            if let Some(m) = args.mark {
                s.set_mark(m)?;
            }
            if let Some(src) = args.source {
                s.bind(&SocketAddr::new(src, 0).into())?;
            }
            s.connect_timeout(&args.addr.into(), timeout)?;
            Ok(s)
        })?
        .with_context(|| format!("connecting to {}", args.addr))?;
    let mut stream: std::net::TcpStream = sock.into();
    stream.set_read_timeout(Some(timeout))?;
    writeln!(stream, "{}", args.send)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("reading the answer")?;
    Ok(line.trim().to_string())
}
